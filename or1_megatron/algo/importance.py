"""Importance-sampling correction of the trainer/engine mismatch (`algo.is_correction`).

The engine samples with its own numerics and, in one-step-off mode, with weights a step older
than the trainer's; the PPO ratio is taken against the trainer's old log-probs, so each token is
weighted by how much likelier the trainer's old policy makes it than the engine did:
- "tis" (truncated IS): w = min(pi_old / pi_engine, cap);
- "mis" (masked IS): w = pi_old / pi_engine where that is <= cap, else 0 (the token is dropped);
- "none": w = 1 (the paper's configs, which reproduce OR1).
Weights are computed on the driver from host tensors, detached (they scale the policy-gradient
term, never receive gradients), and are 1 outside the response.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from or1_megatron.config.schema import IS_CORRECTIONS as MODES


@dataclass
class MismatchStats:
    """Sums over response tokens, to be added over samples and divided by `tokens`."""

    tokens: float = 0.0
    abs_log_ratio_sum: float = 0.0
    capped: float = 0.0

    def add(self, other: "MismatchStats") -> None:
        self.tokens += other.tokens
        self.abs_log_ratio_sum += other.abs_log_ratio_sum
        self.capped += other.capped

    def metrics(self) -> dict[str, float]:
        tokens = max(self.tokens, 1.0)
        return {"mismatch/abs_log_ratio_mean": self.abs_log_ratio_sum / tokens,
                "mismatch/capped_fraction": self.capped / tokens}


def importance_weights(old_logprob: torch.Tensor, engine_logprob: torch.Tensor,
                       response_mask: torch.Tensor, mode: str, cap: float
                       ) -> tuple[torch.Tensor, MismatchStats]:
    """Per-position weights (the shape of `old_logprob`) and the mismatch statistics.

    `engine_logprob` is aligned with `old_logprob` (positions outside the response are ignored).
    `capped` counts the tokens whose ratio exceeds `cap` (truncated by tis, dropped by mis).
    """
    if mode not in MODES:
        raise ValueError(f"importance-sampling mode must be one of {MODES}, got {mode!r}")
    if engine_logprob.shape != old_logprob.shape:
        raise ValueError(f"engine log-probs {tuple(engine_logprob.shape)} do not align with the "
                         f"trainer's {tuple(old_logprob.shape)}")
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_logprob.double() - engine_logprob.double(),
                            torch.zeros((), dtype=torch.float64))
    ratio = torch.exp(log_ratio)
    over = mask & (ratio > cap)
    stats = MismatchStats(tokens=float(mask.sum()), abs_log_ratio_sum=float(log_ratio.abs().sum()),
                          capped=float(over.sum()))
    if mode == "none":
        weights = torch.ones_like(ratio)
    elif mode == "tis":
        weights = ratio.clamp(max=cap)
    else:
        weights = torch.where(over, torch.zeros_like(ratio), ratio)
    weights = torch.where(mask, weights, torch.ones_like(weights))
    return weights.to(torch.float32), stats


def aligned_engine_logprobs(prompt_length: int, response_logprobs: list[float]) -> torch.Tensor:
    """The engine's log-probs of the response tokens at the trainer's positions (position j
    predicts token j + 1: the response starts at prompt_length - 1); 0 over the prompt."""
    values = torch.zeros(prompt_length - 1 + len(response_logprobs), dtype=torch.float32)
    values[prompt_length - 1:] = torch.tensor(response_logprobs, dtype=torch.float32)
    return values
