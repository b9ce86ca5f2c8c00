"""Progress lines for long work (conversion, evaluation, data preparation).

Prints `label: done/total (pct) rate eta` at most once per `interval_s` and once at the end, on
stderr, so logs of batch jobs stay short and an interactive user still sees that work moves.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class Progress:
    """Counts items (and optionally bytes) done out of a known total."""

    def __init__(self, total: int, label: str, interval_s: float = 2.0, stream: TextIO | None = None):
        self.total = total
        self.label = label
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last_print = 0.0

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        self.done += items
        self.bytes += nbytes
        now = time.monotonic()
        if self.done >= self.total or now - self._last_print >= self.interval_s:
            self._last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"{self.label}: {self.done}/{self.total} ({pct:.0f}%)"
        if self.bytes:
            line += f" {_human_bytes(self.bytes)} at {_human_bytes(self.bytes / elapsed)}/s"
        if 0 < self.done < self.total:
            line += f", eta {elapsed * (self.total - self.done) / self.done:.0f}s"
        print(line, file=self.stream, flush=True)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start
