"""A run's metrics: `metrics.jsonl` (one object per step), TensorBoard scalars, a console line.

On resume the JSONL file keeps only the steps up to the checkpoint it resumes from and
TensorBoard purges later events, so a run killed with SIGKILL and resumed leaves the same
records as one that never stopped. Every line is flushed when written.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

# (metric, console label, format) in the order of the console line.
CONSOLE_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("eval/heldout_accuracy", "heldout", "{:.3f}"),
    ("actor/entropy", "entropy", "{:.3f}"),
    ("actor/entropy_coef", "coef", "{:.4f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("actor/clipfrac", "clip", "{:.3f}"),
    ("actor/grad_norm", "gnorm", "{:.3f}"),
    ("time/step_s", "step_s", "{:.1f}"),
    ("time/sync_s", "sync_s", "{:.2f}"),
    ("perf/tokens_per_s", "tok/s", "{:.0f}"),
)


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool, resume_after_step: int,
                 console_every: int = 1, stream: TextIO | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_after_step)
        self._file = open(self.path, "a")
        self.console_every = console_every
        self.stream = stream or sys.stdout
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                    purge_step=resume_after_step + 1 if resume_after_step >= 0 else None)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, Any], total_steps: int) -> None:
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(name, value, step)
            self.tb.flush()
        if step % self.console_every == 0 or step == total_steps:
            print(console_line(step, total_steps, metrics), file=self.stream, flush=True)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def console_line(step: int, total_steps: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}/{total_steps}", f"stage {metrics.get('stage', 0)}"]
    for name, label, fmt in CONSOLE_FIELDS:
        if name in metrics:
            parts.append(f"{label} {fmt.format(metrics[name])}")
    return " | ".join(parts)
