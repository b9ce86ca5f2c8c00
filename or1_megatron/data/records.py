"""The one problem record every loader produces, and the error/skip accounting of loaders.

Owns `ProblemRecord` (verl's row schema, typed), `DataError` (names the file, row and field) and
`SkipCounter` (counted, logged skips). It reads no files.
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from or1_megatron.errors import OR1Error

logger = logging.getLogger(__name__)


class DataError(OR1Error):
    """A data file or row is malformed; the message names the file, the row and the field."""

    def __init__(self, path: str, row: int | None, reason: str) -> None:
        where = f"{path}: row {row}" if row is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path, self.row, self.reason = str(path), row, reason


@dataclass
class ProblemRecord:
    """One training or evaluation problem, in verl's schema.

    `prompt` is a chat (list of {role, content}); `ground_truth` is, for math, the answer string
    or a list of accepted strings and, for code, a dict in one of OR1's test schemas.
    `extra_info` keeps the source's metadata (e.g. Skywork-OR1's `model_difficulty`).
    """

    uid: str
    data_source: str
    ability: str
    prompt: list[dict[str, str]]
    ground_truth: Any
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The user turns' text (for length filters and decontamination)."""
        return "\n".join(m["content"] for m in self.prompt if m.get("role") == "user")

    def reward_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `or1_megatron.rewards.compute_score`, less the response."""
        return {"data_source": self.data_source, "ground_truth": self.ground_truth,
                "extra_info": {**self.extra_info, "ability": self.ability}}

    def reward_task(self, solution_str: str, finish_reason: str) -> dict[str, Any]:
        """One `compute_score` call for a response; the engine's finish reason goes with it,
        since OR1's truncation rule needs it (a response cut at the length limit scores 0)."""
        kwargs = self.reward_kwargs()
        kwargs["extra_info"]["finish_reason"] = finish_reason
        return {**kwargs, "solution_str": solution_str}

    def to_verl_row(self) -> dict[str, Any]:
        """A verl row; a non-string ground truth is stored as JSON text, as Skywork-OR1-RL-Data
        does, so that math and code rows share one parquet column type."""
        truth = self.ground_truth if isinstance(self.ground_truth, str) else json.dumps(self.ground_truth)
        return {"data_source": self.data_source, "prompt": self.prompt, "ability": self.ability,
                "reward_model": {"ground_truth": truth, "style": "rule"},
                "extra_info": {**self.extra_info, "uid": self.uid}}


class SkipCounter:
    """Counts rows skipped per reason for one file; `log()` reports them (nothing is dropped silently)."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self.reasons: collections.Counter[str] = collections.Counter()
        self.rows: list[tuple[int, str]] = []  # (row, reason) of every skip, for reports
        self.total = 0

    def skip(self, row: int, reason: str) -> None:
        self.reasons[reason] += 1
        self.rows.append((row, reason))
        logger.debug("%s: row %d skipped: %s", self.path, row, reason)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def log(self) -> None:
        if self.skipped:
            detail = "; ".join(f"{n} x {reason}" for reason, n in self.reasons.most_common())
            logger.warning("%s: skipped %d of %d rows: %s", self.path, self.skipped, self.total, detail)
