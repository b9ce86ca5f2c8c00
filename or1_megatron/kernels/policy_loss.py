"""The token-level PPO policy loss of the Skywork-OR1 recipe and its metrics, in one pass.

This module owns `policy_loss`: the clipped surrogate with separate low/high clip ranges
(clip-higher), optional dual clip, the entropy bonus, the response mask, and normalisation by a
token count the caller supplies. It never reduces across ranks or micro-batches itself: the loss
is divided by the GLOBAL token count (all response tokens of the optimizer step, over DP ranks
and micro-batches), so summing the per-micro-batch losses over the step gives the exact token
mean; the metrics are per-micro-batch sums that the caller adds up and divides the same way.
"""
from __future__ import annotations

import torch


def _check(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    global_token_count: int | float | torch.Tensor,
    is_weight: torch.Tensor | None = None,
) -> None:
    named = {"old_logprob": old_logprob, "advantages": advantages, "response_mask": response_mask}
    if entropy is not None:
        named["entropy"] = entropy
    if is_weight is not None:
        named["is_weight"] = is_weight
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != logprob.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have the shape of logprob {tuple(logprob.shape)}, got {shape}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip}")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef is {entropy_coef} but no entropy was given")
    if isinstance(global_token_count, torch.Tensor):
        # A device tensor is accepted without a host sync; its value is the caller's contract.
        if global_token_count.numel() != 1:
            raise ValueError(f"global_token_count must be a scalar, got shape {tuple(global_token_count.shape)}")
    elif not global_token_count > 0:
        raise ValueError(f"global_token_count must be > 0, got {global_token_count}")


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    global_token_count: int | float | torch.Tensor,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO loss ``sum_mask(pg_token - entropy_coef * entropy_token) / global_token_count``.

    ``pg_token = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(logprob -
    old_logprob)``; with ``dual_clip = c`` it is further capped at ``-c A`` for ``A < 0``.
    Tokens where ``response_mask`` is 0/False contribute nothing (not even NaN). ``is_weight``
    (importance-sampling correction, algo/importance.py) scales each token's pg_token; it is
    treated as a constant.

    Returns ``(loss, metrics)``. ``loss`` is a 0-d tensor with gradients to ``logprob`` and
    ``entropy``. ``metrics`` are detached 0-d fp32 tensors, all SUMS over this call's masked
    tokens (no host sync), to be added over micro-batches and ranks and divided by the summed
    ``tokens``:

    - ``tokens``: number of masked tokens;
    - ``pg_loss_sum``: sum of pg_token;
    - ``clipfrac_sum``: tokens whose ratio was clipped (``clipfrac_low_sum`` + ``clipfrac_high_sum``:
      A < 0 and r < 1 - clip_low, A > 0 and r > 1 + clip_high);
    - ``dual_clipfrac_sum``: tokens capped by the dual clip;
    - ``approx_kl_sum``: sum of ``old_logprob - logprob`` (k1 estimate of KL(old || new));
    - ``entropy_sum``: sum of the entropy (0 when no entropy is given).
    """
    _check(logprob, old_logprob, advantages, response_mask, clip_low, clip_high, dual_clip,
           entropy, entropy_coef, global_token_count, is_weight)
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logprob.device)
    # Mask before exp: a padded token's -inf logprob must give neither inf nor a NaN gradient.
    log_ratio = torch.where(mask, logprob.float() - old_logprob.float(), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clip_low_hit = mask & (adv < 0) & (ratio < 1.0 - clip_low)
    clip_high_hit = mask & (adv > 0) & (ratio > 1.0 + clip_high)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_hit = mask & (adv < 0) & (pg > cap)
        pg = torch.where(dual_hit, cap, pg)
    else:
        dual_hit = torch.zeros_like(mask)
    if is_weight is not None:
        pg = pg * is_weight.detach().float()
    token_loss = pg
    if entropy is not None and entropy_coef != 0.0:
        token_loss = pg - entropy_coef * entropy.float()
    loss = torch.where(mask, token_loss, zero).sum() / global_token_count

    with torch.no_grad():
        maskf = mask.float()
        metrics = {
            "tokens": maskf.sum(),
            "pg_loss_sum": torch.where(mask, pg, zero).sum(),
            "clipfrac_sum": (clip_low_hit | clip_high_hit).float().sum(),
            "clipfrac_low_sum": clip_low_hit.float().sum(),
            "clipfrac_high_sum": clip_high_hit.float().sum(),
            "dual_clipfrac_sum": dual_hit.float().sum(),
            "approx_kl_sum": (-log_ratio).sum(),
            "entropy_sum": torch.where(mask, entropy.float(), zero).sum() if entropy is not None else zero.clone(),
        }
    return loss, {name: value.detach() for name, value in metrics.items()}
