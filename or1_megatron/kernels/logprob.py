"""Fused, vocab-parallel log-probability and entropy of the output layer, with its backward.

This module owns `fused_logprob_entropy`: argument checks, the choice of row kernels (Triton or
torch), the loop over token chunks, the matmuls with the weight, and the tensor-parallel
combination of the softmax statistics. It never holds more than one chunk of logits
(``chunk_size x V_local``) in forward or backward: the backward recomputes each chunk's logits
from ``hidden`` and ``weight`` and overwrites them with their gradient.

Tensor parallelism (Megatron's vocab-parallel output layer): rank r of ``tp_group`` holds the
contiguous rows ``[r * V_local, (r + 1) * V_local)`` of the weight. Each rank computes local
statistics (max, sum of exp, entropy term, target logit) for its columns; one all-reduce MAX and
one all-reduce SUM give the full-vocabulary values on every rank. In backward the gradient with
respect to ``hidden`` is a sum over the vocabulary, so the per-rank partial sums are all-reduced
(an all-reduce whose backward is an identity gives the wrong hidden gradient under TP).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.distributed as dist

from or1_megatron.kernels import logprob_torch

IMPLS = ("auto", "torch", "triton")

# Elements of one fp32 logits chunk: ~16 MiB on CPU (cache-friendly and small next to the naive
# [T, V] logits) and ~256 MiB on GPU (large enough for full-speed cuBLAS matmuls).
_CHUNK_ELEMS = {"cuda": 1 << 26}
_CHUNK_ELEMS_DEFAULT = 1 << 22


@functools.lru_cache(maxsize=1)
def _triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("or1_megatron.kernels.logprob_triton")
    except ImportError:
        return None


def triton_available() -> bool:
    """Whether the Triton row kernels can be imported here (the `triton` package is installed)."""
    return _triton_module() is not None


def _row_kernels(impl: str, device: torch.device) -> ModuleType:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and device.type != "cuda"):
        return logprob_torch  # "auto" off CUDA: not even importing triton (slow, and GPU-only)
    module = _triton_module()
    if module is not None:
        return module
    if impl == "triton":
        raise ImportError("impl='triton' needs the `triton` package, which is not importable")
    return logprob_torch


@functools.lru_cache(maxsize=None)
def _has_fp32_out_mm(device_type: str, dtype: torch.dtype) -> bool:
    # torch.mm(..., out_dtype=fp32) keeps bf16/fp16 logits in fp32 without an fp32 weight copy;
    # it exists on CUDA only (torch >= 2.8), so probe once and fall back to a cast.
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as an fp32 tensor, accumulated in fp32 whatever the input dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _has_fp32_out_mm(a.device.type, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _add_weight_grad(grad_w32: torch.Tensor, dz: torch.Tensor, h_c: torch.Tensor) -> None:
    """``grad_w32[:n_cols] += dz.T @ h_c`` in fp32, with temporaries no larger than a logits chunk."""
    if dz.dtype == torch.float32:
        grad_w32[: dz.shape[1]].addmm_(dz.t(), h_c)
        return
    # bf16/fp16: the fp32 product of the whole shard would be a [V_local, H] temporary per chunk
    # (2.5 GB for Qwen's vocab at H=4096), so add it in blocks of vocabulary rows.
    rows = max(1, _CHUNK_ELEMS.get(dz.device.type, _CHUNK_ELEMS_DEFAULT) // h_c.shape[1])
    for start in range(0, dz.shape[1], rows):
        stop = min(start + rows, dz.shape[1])
        grad_w32[start:stop] += _mm_fp32(dz[:, start:stop].t(), h_c)


def _tp_rank_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    tp_size: int,
    valid_vocab_size: int | None,
    chunk_size: int | None,
) -> int:
    """Raise a clear error for bad arguments; return the valid (unpadded) global vocab size."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D [T, H] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V_local, H] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D [T] tensor, got shape {tuple(getattr(targets, 'shape', ()))}")
    tokens, hidden_size = hidden.shape
    if tokens == 0:
        raise ValueError("hidden has no tokens (T = 0): there is nothing to score")
    if weight.shape[1] != hidden_size:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} but hidden has {hidden_size} "
            f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})"
        )
    if targets.shape[0] != tokens:
        raise ValueError(f"targets has {targets.shape[0]} entries but hidden has {tokens} tokens")
    if weight.shape[0] == 0:
        raise ValueError("weight has no vocabulary rows (V_local = 0)")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a floating dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, {targets.device}"
        )
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    padded = weight.shape[0] * tp_size
    valid = padded if valid_vocab_size is None else valid_vocab_size
    if not isinstance(valid, int) or not 1 <= valid <= padded:
        raise ValueError(
            f"valid_vocab_size must be an int in [1, V_local * tp_size = {padded}], got {valid_vocab_size!r}"
        )
    bad = (targets < 0) | (targets >= valid)
    if bool(bad.any()):  # one device sync; a wrong id would otherwise give a silently wrong logprob
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"targets must be global token ids in [0, {valid}); {int(bad.sum())} are not, "
            f"first at position {first} with value {int(targets[first])}"
        )
    return valid


def _combine(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary (logprob, entropy, lse) from the per-rank stats ``[4, T] = (m, s, q, zt)``."""
    m, s, q, zt = stats.unbind(0)
    big_m = m.clone()
    if tp_size > 1:
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=tp_group)
    # A rank whose columns are all padding has m = -inf and s = q = 0: shift it by 0, not NaN.
    m_safe = torch.where(torch.isfinite(m), m, big_m)
    scale = torch.exp(m_safe - big_m)
    sums = torch.stack([s * scale, scale * (q + (m_safe - big_m) * s), zt])
    if tp_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    total_s, total_q, target_logit = sums.unbind(0)
    log_s = torch.log(total_s)
    lse = big_m + log_s
    # H = lse - E_p[z] = log S - E_p[z - M]; both terms are O(log V), no cancellation of O(M).
    entropy = log_s - total_q / total_s
    logprob = target_logit - lse
    return logprob, entropy, lse


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, valid_vocab_size, chunk_size, kernels):
        tp_rank, tp_size = _tp_rank_size(tp_group)
        v_local = weight.shape[0]
        offset = tp_rank * v_local
        # Global ids >= valid_vocab_size are Megatron's padding: a suffix of the vocabulary, so on
        # each rank the valid columns are a prefix and the padding is simply never computed.
        n_cols = max(0, min(v_local, valid_vocab_size - offset))
        local_targets = targets.long() - offset
        local_targets = torch.where(
            (local_targets >= 0) & (local_targets < n_cols), local_targets, torch.full_like(local_targets, -1)
        )
        tokens = hidden.shape[0]
        if chunk_size is None:
            budget = _CHUNK_ELEMS.get(hidden.device.type, _CHUNK_ELEMS_DEFAULT)
            chunk_size = max(16, budget // max(n_cols, 1))
        chunk_size = min(chunk_size, tokens)
        inv_temp = 1.0 / float(temperature)

        stats = torch.empty((4, tokens), dtype=torch.float32, device=hidden.device)
        if n_cols == 0:
            stats[0].fill_(float("-inf"))
            stats[1:].zero_()
        else:
            w_t = weight[:n_cols].t()
            for start in range(0, tokens, chunk_size):
                stop = min(start + chunk_size, tokens)
                logits = _mm_fp32(hidden[start:stop], w_t)
                chunk_stats = kernels.row_stats(logits, local_targets[start:stop], inv_temp)
                for i in range(4):
                    stats[i, start:stop] = chunk_stats[i]
                del logits
        logprob, entropy, lse = _combine(stats, tp_group, tp_size)

        ctx.save_for_backward(hidden, weight, local_targets, lse, entropy)
        ctx.tp_group, ctx.tp_size, ctx.n_cols = tp_group, tp_size, n_cols
        ctx.chunk_size, ctx.inv_temp, ctx.kernels = chunk_size, inv_temp, kernels
        # Exact arithmetic gives logprob <= 0 and entropy >= 0; clamp the rounding (values only:
        # the backward uses the unclamped lse and entropy, which are what the gradient needs).
        return logprob.clamp(max=0.0), entropy.clamp(min=0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy):
        # The backward runs outside the caller's autocast context in general; make sure of it.
        with torch.autocast(device_type=grad_logprob.device.type, enabled=False):
            return _FusedLogprobEntropy._backward(ctx, grad_logprob, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, local_targets, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = grad_w = None
        if not (need_h or need_w):
            return (None,) * 8
        tokens = hidden.shape[0]
        n_cols = ctx.n_cols
        grad_logprob = grad_logprob.float()
        grad_entropy = grad_entropy.float()
        # fp32 accumulators: the hidden gradient is all-reduced over TP in fp32, and the weight
        # gradient sums over token chunks without rounding to bf16 after each chunk.
        grad_h32 = torch.zeros((tokens, hidden.shape[1]), dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if n_cols > 0:
            w = weight[:n_cols]
            for start in range(0, tokens, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, tokens)
                h_c = hidden[start:stop]
                logits = _mm_fp32(h_c, w.t())
                dz = ctx.kernels.row_grad_(
                    logits,
                    local_targets[start:stop],
                    lse[start:stop],
                    entropy[start:stop],
                    grad_logprob[start:stop],
                    grad_entropy[start:stop],
                    ctx.inv_temp,
                )
                del logits
                dz = dz.to(weight.dtype)  # matmuls in the model's dtype, accumulated in fp32
                if need_h:
                    grad_h32[start:stop] = _mm_fp32(dz, w)
                if need_w:
                    _add_weight_grad(grad_w32, dz, h_c)
                del dz
        if need_h:
            if ctx.tp_size > 1:
                dist.all_reduce(grad_h32, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_h = grad_h32.to(hidden.dtype)
        if need_w:
            grad_w = grad_w32.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    valid_vocab_size: int | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(hidden @ weight.T / temperature)[targets]`` and the entropy, over the full vocab.

    Args:
        hidden: ``[T, H]`` final hidden states (fp32, bf16 or fp16; same dtype as ``weight``).
        weight: ``[V_local, H]`` this rank's contiguous shard of the output layer: rank r of
            ``tp_group`` owns global ids ``[r * V_local, (r + 1) * V_local)``.
        targets: ``[T]`` global token ids in ``[0, valid_vocab_size)``.
        temperature: the sampling temperature the logits are divided by (> 0).
        tp_group: the tensor-parallel group the vocabulary is split over; None for no TP.
        valid_vocab_size: the unpadded vocabulary size; global ids at or above it are Megatron's
            padding and are excluded from the softmax. Defaults to ``V_local * tp_size``.
        chunk_size: tokens per chunk of logits; None picks ~16 MiB (CPU) / ~256 MiB (GPU) chunks.
        impl: "triton", "torch", or "auto" (Triton row kernels on CUDA when importable).

    Returns:
        ``(logprob, entropy)``, fp32 ``[T]``, identical on every rank of ``tp_group``; both are
        differentiable with respect to ``hidden`` (full-vocabulary gradient on every rank) and
        ``weight`` (this rank's shard). Statistics are accumulated in fp32 for any input dtype.

    Memory besides one logits chunk: the backward accumulates the gradients in fp32 (``[T, H]``
    and ``[V_local, H]``; for a bf16 weight the latter is twice the weight's size). Precision: on
    CUDA the bf16 matmul writes fp32 logits (``torch.mm(out_dtype=)``); elsewhere its output is
    rounded to bf16 first, exactly as in the naive path. Checking ``targets`` costs one sync.
    """
    _, tp_size = _tp_rank_size(tp_group)
    valid = _check_inputs(hidden, weight, targets, temperature, tp_size, valid_vocab_size, chunk_size)
    kernels = _row_kernels(impl, hidden.device)
    # Autocast off: an ambient bf16 autocast would silently change the matmuls' dtypes.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _FusedLogprobEntropy.apply(
            hidden.contiguous(), weight.contiguous(), targets, float(temperature), tp_group, valid, chunk_size, kernels
        )
