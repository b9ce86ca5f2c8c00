"""The probe batch that proves a sync: every engine's log-probabilities against the trainer's.

Each engine continues a fixed set of prompts greedily; the trainer then scores exactly the
sequences each engine produced (teacher-forced), and the log-probability of every generated
token must agree within the tolerance. An engine with stale or mis-mapped weights fails here by
name. This module compares numbers only; the coordinator decides when to run it.
"""
from __future__ import annotations

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


def compare(label: str, prompts: Sequence[list[int]], results: Sequence[GenerateResult],
            trainer: dict[tuple[int, ...], list[float]], tolerance: float) -> float:
    """Max |engine - trainer| log-prob over the generated tokens; SyncVerificationError if above
    `tolerance`, naming `label`, the prompt and the token."""
    worst, where = 0.0, ""
    for k, (prompt, result) in enumerate(zip(prompts, results)):
        sequence = tuple(prompt) + tuple(result.output_ids)
        expected = trainer[sequence][len(prompt) - 1:]
        got = result.output_logprobs or []
        if len(got) != len(expected):
            raise SyncVerificationError(f"{label}: probe prompt {k}: {len(got)} log-probs for "
                                        f"{len(expected)} generated tokens")
        for j, (a, b) in enumerate(zip(got, expected)):
            if abs(a - b) > worst or a != a:
                worst, where = abs(a - b) if a == a else float("inf"), f"prompt {k}, token {j}"
    if worst > tolerance:
        raise SyncVerificationError(
            f"{label}: log-probs differ from the trainer's by {worst:.3g} (> sync.verify_tolerance "
            f"{tolerance:g}) at probe {where}: its weights are not the trainer's")
    return worst
