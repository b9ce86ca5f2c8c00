"""Prompt filters of the OR1 recipe: prompt length, offline difficulty, online between stages.

Owns the keep/drop rules and their counts; every drop is counted and logged by reason. It never
samples responses itself: pass rates come from `model_difficulty` in the data (Skywork-OR1-RL-Data)
or from a pass-rate file written by a sampling tool (tools/estimate_difficulty.py), and online
solve counts from the trainer's rewards (`SolveTracker`).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from or1_megatron.data.records import DataError, ProblemRecord

logger = logging.getLogger(__name__)

# Samples per prompt in OR1's offline difficulty estimate (paper: 16 for math, 8 for code).
OFFLINE_SAMPLES = {"math": 16, "code": 8}


@dataclass
class FilterResult:
    """Kept records, in input order, and the count of dropped ones per reason."""

    kept: list[ProblemRecord]
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return len(self.kept) + sum(self.dropped.values())

    def dropped_text(self) -> str:
        """The drops by reason, most frequent first ("none" without any)."""
        return ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"

    def log(self, name: str) -> None:
        logger.info("%s filter: kept %d of %d prompts; dropped: %s", name, len(self.kept), self.total,
                    self.dropped_text())


def prompt_tokens(record: ProblemRecord, tokenizer: Any) -> int:
    """The prompt's length in tokens, rendered with the chat template as the trainer sends it."""
    text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def filter_prompt_length(records: Sequence[ProblemRecord], tokenizer: Any,
                         max_prompt_tokens: int, lengths: dict[str, int] | None = None) -> FilterResult:
    """Drop prompts longer than `max_prompt_tokens` once rendered with the chat template
    (`lengths`: already measured lengths by uid)."""
    result = FilterResult(kept=[])
    for record in records:
        length = lengths[record.uid] if lengths else prompt_tokens(record, tokenizer)
        if length > max_prompt_tokens:
            result.dropped[f"longer than {max_prompt_tokens} tokens"] += 1
        else:
            result.kept.append(record)
    result.log("prompt-length")
    return result


def _keep_by_solved(solved: int, samples: int) -> str | None:
    """None to keep; else the drop reason (OR1 drops prompts solved 0/N or N/N)."""
    if solved <= 0:
        return f"solved 0/{samples}"
    if solved >= samples:
        return f"solved {samples}/{samples}"
    return None


def filter_by_model_difficulty(records: Sequence[ProblemRecord], model: str,
                               samples: dict[str, int] | None = None) -> FilterResult:
    """Offline filter on Skywork-OR1-RL-Data's `extra_info.model_difficulty[model]`.

    The value is the number of the model's samples (16 math, 8 code by default) that solved the
    prompt. A prompt without a value for `model` is dropped (as OR1's released scripts do), counted.
    """
    samples = samples or OFFLINE_SAMPLES
    result = FilterResult(kept=[])
    for record in records:
        difficulty = (record.extra_info.get("model_difficulty") or {}).get(model)
        if difficulty is None:
            result.dropped[f"no model_difficulty for {model}"] += 1
            continue
        n = samples.get(record.ability, OFFLINE_SAMPLES["math"])
        try:
            solved = int(difficulty)
        except (TypeError, ValueError):
            raise DataError(record.uid, None, f"extra_info.model_difficulty[{model!r}]={difficulty!r} "
                            "is not a number of solved samples") from None
        reason = _keep_by_solved(solved, n)
        if reason:
            result.dropped[reason] += 1
        else:
            result.kept.append(record)
    result.log("offline (model_difficulty)")
    return result


def format_pass_rate(uid: str, solved: int, samples: int) -> str:
    """One line of a pass-rate file (what `load_pass_rates` reads), newline included."""
    if not 0 <= solved <= samples or samples <= 0:
        raise ValueError(f"{uid}: solved={solved} is not within 0..samples={samples}")
    return json.dumps({"uid": str(uid), "solved": int(solved), "samples": int(samples)}) + "\n"


def load_pass_rates(path: str | Path) -> dict[str, tuple[int, int]]:
    """Read a pass-rate file: JSON lines {"uid": str, "solved": int, "samples": int}."""
    rates: dict[str, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                solved, samples = int(row["solved"]), int(row["samples"])
                uid = str(row["uid"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(str(path), index, f"pass-rate rows need uid, solved, samples: {exc!r}") from exc
            if not 0 <= solved <= samples or samples <= 0:
                raise DataError(str(path), index, f"solved={solved} is not within 0..samples={samples}")
            rates[uid] = (solved, samples)
    return rates


def filter_by_pass_rate(records: Sequence[ProblemRecord],
                        pass_rates: dict[str, tuple[int, int]]) -> FilterResult:
    """Offline filter on measured pass rates (uid -> (solved, samples)); unmeasured prompts are dropped."""
    result = FilterResult(kept=[])
    for record in records:
        if record.uid not in pass_rates:
            result.dropped["no measured pass rate"] += 1
            continue
        reason = _keep_by_solved(*pass_rates[record.uid])
        if reason:
            result.dropped[reason] += 1
        else:
            result.kept.append(record)
    result.log("offline (pass rate)")
    return result


def training_filters(
    records: Sequence[ProblemRecord],
    *,
    model: str = "",
    pass_rates: str | Path = "",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
    lengths: dict[str, int] | None = None,
) -> tuple[list[ProblemRecord], list[tuple[str, FilterResult]]]:
    """The trainer's filters before the first step, in its order, each where configured:
    offline difficulty from `model_difficulty[model]`, offline pass rates from the `pass_rates`
    file, then prompt length under `tokenizer` (needs `max_prompt_length`). Returns what remains
    and every applied filter's (description, result); `or1 train` and `or1 data check` both
    call this, so the check reports exactly what a run keeps."""
    kept, applied = list(records), []
    if model:
        applied.append((f"offline, model_difficulty[{model}] solved neither 0 nor N",
                        filter_by_model_difficulty(kept, model)))
        kept = applied[-1][1].kept
    if pass_rates:
        applied.append((f"offline, pass rates of {pass_rates}", filter_by_pass_rate(kept, load_pass_rates(pass_rates))))
        kept = applied[-1][1].kept
    if tokenizer is not None and max_prompt_length is not None:
        applied.append((f"prompt length <= {max_prompt_length} tokens",
                        filter_prompt_length(kept, tokenizer, max_prompt_length, lengths)))
        kept = applied[-1][1].kept
    return kept, applied


class SolveTracker:
    """Rewards per prompt during a stage, for the online filter applied before the next stage."""

    def __init__(self) -> None:
        self.solved: collections.Counter[str] = collections.Counter()
        self.samples: collections.Counter[str] = collections.Counter()

    def update(self, uids: Iterable[str], rewards: Iterable[float]) -> None:
        """Record one reward per sample (a group of n samples repeats its prompt's uid n times)."""
        for uid, reward in zip(uids, rewards, strict=True):
            self.samples[uid] += 1
            self.solved[uid] += int(reward >= 1.0)

    def solved_in_every_sample(self) -> set[str]:
        return {uid for uid, n in self.samples.items() if self.solved[uid] == n}

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"solved": dict(self.solved), "samples": dict(self.samples)}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.solved = collections.Counter(state["solved"])
        self.samples = collections.Counter(state["samples"])


def online_filter(records: Sequence[ProblemRecord], tracker: SolveTracker) -> FilterResult:
    """Drop prompts the actor solved in every sample during the previous stage."""
    solved_all = tracker.solved_in_every_sample()
    result = FilterResult(kept=[])
    for record in records:
        if record.uid in solved_all:
            result.dropped["solved in every sample last stage"] += 1
        else:
            result.kept.append(record)
    result.log("online")
    return result
