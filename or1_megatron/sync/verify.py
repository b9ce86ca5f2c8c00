"""The probe batch that proves a sync: every engine's log-probabilities against the trainer's.

Each engine continues a fixed set of prompts greedily; the trainer then scores exactly the
sequences each engine produced (teacher-forced), and the log-probability of every generated
token must agree within the tolerance. An engine with stale or mis-mapped weights fails here by
name. This module compares numbers only; the coordinator decides when to run it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from or1_megatron.rollout.engine import GenerateResult
from or1_megatron.sync.plan import SyncVerificationError

# score(sequences) -> for each sequence, the log-probability of token j + 1 given tokens <= j
# (length len(sequence) - 1), computed by the trainer at temperature 1.
ScoreFn = Callable[[list[list[int]]], list[list[float]]]


def probe_prompts(vocab_size: int, count: int, seed: int = 20250527) -> list[list[int]]:
    """`count` fixed prompts of 3-6 token ids (the same on every call)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [3 + i % 4 for i in range(count)]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def probe_sampling_params(new_tokens: int) -> dict:
    return {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}


def probe_sequences(prompts: Sequence[list[int]], results: Sequence[GenerateResult]) -> list[list[int]]:
    return [list(p) + list(r.output_ids) for p, r in zip(prompts, results)]


@dataclass(frozen=True)
class Tolerance:
    """How far an engine's log-probs may be from the trainer's: per token (max |diff|) and on
    average over the probe's tokens (mean |diff|)."""

    max_abs: float
    mean_abs: float


# By the policy's dtype. fp32 engines and trainers agree to round-off. In bf16, two sets of
# kernels (the trainer's and SGLang's) differ by 1e-2 to 1e-1 on some tokens (a bf16 copy of
# the test suite's tiny model against its fp32 self: 0.07 at most, 0.024 on average), so one
# token may be far off while the mean stays small; a wrong, missing or mis-mapped weight moves
# every token (weights 1% off: 0.08 on average). A weight one optimizer step stale is below
# bf16's resolution: the weight-version check after every sync catches that, not the probe.
DEFAULT_TOLERANCES = {"fp32": Tolerance(max_abs=1e-3, mean_abs=1e-4),
                      "bf16": Tolerance(max_abs=0.5, mean_abs=5e-2)}


def tolerance(dtype: str, max_abs: float = 0.0, mean_abs: float = 0.0) -> Tolerance:
    """The rule for `dtype`, with either bound overridden where it is > 0."""
    default = DEFAULT_TOLERANCES[dtype]
    return Tolerance(max_abs=max_abs or default.max_abs, mean_abs=mean_abs or default.mean_abs)


def compare(label: str, prompts: Sequence[list[int]], results: Sequence[GenerateResult],
            trainer: dict[tuple[int, ...], list[float]], rule: Tolerance) -> float:
    """Max |engine - trainer| log-prob over the generated tokens; SyncVerificationError, naming
    `label`, the prompt and the token, if it or the mean |diff| is above `rule`."""
    worst, where, total, count = 0.0, "", 0.0, 0
    for k, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        sequence = tuple(prompt) + tuple(result.output_ids)
        expected = trainer[sequence][len(prompt) - 1:]
        got = result.output_logprobs or []
        if len(got) != len(expected):
            raise SyncVerificationError(f"{label}: probe prompt {k}: {len(got)} log-probs for "
                                        f"{len(expected)} generated tokens")
        for j, (a, b) in enumerate(zip(got, expected)):
            diff = abs(a - b) if a == a else float("inf")  # NaN from the engine: infinitely off
            total, count = total + diff, count + 1
            if diff > worst:
                worst, where = diff, f"prompt {k}, token {j}"
    mean = total / max(count, 1)
    if worst > rule.max_abs:
        raise SyncVerificationError(
            f"{label}: log-probs differ from the trainer's by {worst:.3g} (> {rule.max_abs:g}, "
            f"sync.verify_tolerance) at probe {where}: its weights are not the trainer's")
    if mean > rule.mean_abs:
        raise SyncVerificationError(
            f"{label}: log-probs differ from the trainer's by {mean:.3g} on average over "
            f"{count} probe tokens (> {rule.mean_abs:g}, sync.verify_mean_tolerance): its "
            "weights are not the trainer's")
    return worst
