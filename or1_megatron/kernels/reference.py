"""Unfused reference formulas: the fp64 oracle for tests and the naive baseline for profiling.

This module owns the plain-torch definitions the fused kernels are measured against:

- `oracle_logprob_entropy`: the fp64 formula on the full (unsharded) weight, differentiable, used
  by the tests and by `tools/profile_kernels.py` as ground truth;
- `naive_logprob_entropy`: what peers do (fp32 ``[T, V_local]`` logits, log_softmax, gather,
  entropy), with Megatron-style vocab-parallel all-reduces under TP; the baseline whose memory
  the fused path must beat.

Nothing here is meant for training: both materialise full logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def oracle_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``(logprob, entropy)`` of ``log_softmax(hidden @ weight[:valid].T / temperature)``.

    ``weight`` is the full ``[V, H]`` output layer; rows at or above ``valid_vocab_size`` are
    padding and excluded. Gradients flow back to ``hidden`` and ``weight`` in their own dtypes.
    """
    valid = weight.shape[0] if valid_vocab_size is None else valid_vocab_size
    logits = hidden.double() @ weight[:valid].double().t() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprob = logp.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logprob, entropy


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: the hidden gradient sums every rank's vocab shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: everything after it is replicated on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def naive_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    valid_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path: fp32 ``[T, V_local]`` logits, then log_softmax/gather/entropy in torch.

    Same arguments and layout as `fused_logprob_entropy`; returns fp32 ``[T]`` tensors.
    """
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    v_local = weight.shape[0]
    valid = v_local * tp_size if valid_vocab_size is None else valid_vocab_size
    n_cols = max(0, min(v_local, valid - rank * v_local))
    if tp_size == 1:
        logits = (hidden @ weight[:n_cols].t()).float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        logprob = logp.gather(1, targets.long().unsqueeze(1)).squeeze(1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return logprob, entropy
    # Megatron's vocab-parallel cross entropy, extended with the entropy terms.
    hidden = _CopyToTP.apply(hidden, tp_group)
    logits = (hidden @ weight[:n_cols].t()).float() / temperature
    local_max = logits.detach().amax(dim=-1) if n_cols else torch.full_like(targets, float("-inf"), dtype=torch.float32)
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - global_max.unsqueeze(1)
    exp = shifted.exp()
    local_t = targets.long() - rank * v_local
    on_rank = (local_t >= 0) & (local_t < n_cols)
    if n_cols:
        picked = shifted.gather(1, local_t.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
        target_shift = torch.where(on_rank, picked, 0.0)
    else:  # this rank holds only padding ids
        target_shift = shifted.sum(-1)
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1), target_shift])
    total_s, total_q, total_t = _ReduceFromTP.apply(sums, tp_group).unbind(0)
    log_s = total_s.log()
    return total_t - log_s, log_s - total_q / total_s


def oracle_outputs(
    hidden: torch.Tensor,
    full_weight: torch.Tensor,
    targets: torch.Tensor,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """fp64 logprob, entropy and the gradients of ``sum(grad_logprob * logprob + grad_entropy * entropy)``.

    ``chunk_tokens`` evaluates the same formula on token chunks (rows are independent), so the
    oracle of a large profile fits in memory; None does all tokens at once.
    """
    w = full_weight.detach().double().requires_grad_(True)
    tokens = hidden.shape[0]
    step = chunk_tokens or tokens
    out = {"logprob": [], "entropy": [], "grad_hidden": []}
    grad_weight = torch.zeros_like(w)
    for start in range(0, tokens, step):
        rows = slice(start, min(start + step, tokens))
        h = hidden[rows].detach().double().requires_grad_(True)
        lp, ent = oracle_logprob_entropy(h, w, targets[rows], temperature, valid_vocab_size)
        loss = (grad_logprob[rows].double() * lp + grad_entropy[rows].double() * ent).sum()
        gh, gw = torch.autograd.grad(loss, (h, w))
        grad_weight += gw
        for key, value in (("logprob", lp), ("entropy", ent), ("grad_hidden", gh)):
            out[key].append(value.detach())
    result = {key: torch.cat(values) for key, values in out.items()}
    result["grad_weight"] = grad_weight
    return result


def max_abs_errors(
    result: dict[str, torch.Tensor | None], oracle: dict[str, torch.Tensor], shard: tuple[int, int] | None = None
) -> dict[str, float]:
    """Max abs error of each entry of ``result`` present in ``oracle``; ``grad_weight`` is compared
    with rows ``shard = (start, stop)`` of the oracle's full-weight gradient when given."""
    errors = {}
    for key, value in result.items():
        if value is None or key not in oracle:
            continue
        want = oracle[key]
        if key == "grad_weight" and shard is not None:
            want = want[shard[0] : shard[1]]
        errors[key] = (value.detach().double() - want).abs().max().item()
    return errors


def oracle_errors(
    hidden: torch.Tensor,
    full_weight: torch.Tensor,
    targets: torch.Tensor,
    logprob: torch.Tensor,
    entropy: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    shard: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Max abs errors of a result against the fp64 oracle, for values and gradients.

    The gradients are those of ``sum(grad_logprob * logprob + grad_entropy * entropy)``;
    ``grad_weight`` is compared with rows ``shard = (start, stop)`` of the full-weight gradient
    (the whole weight when None). Used by the tests and by ``tools/profile_kernels.py``.
    """
    oracle = oracle_outputs(hidden, full_weight, targets, grad_logprob, grad_entropy, temperature, valid_vocab_size)
    result = {"logprob": logprob, "entropy": entropy, "grad_hidden": grad_hidden, "grad_weight": grad_weight}
    return max_abs_errors(result, oracle, shard)
