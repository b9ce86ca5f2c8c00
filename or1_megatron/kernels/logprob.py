"""Fused, vocab-parallel log-probability and entropy of the output layer, with its backward.

This module owns `fused_logprob_entropy`: argument checks, the choice of row kernels (Triton or
torch), the loop over vocabulary chunks, the matmuls with the weight, and the combination of the
softmax statistics over chunks and over the tensor-parallel group.

Both passes walk the vocabulary in chunks of columns, every chunk covering all ``T`` tokens, so
no more than one ``[T, chunk]`` block of logits exists at a time:
- forward: each chunk's local statistics (max, sum of exp, entropy term, target logit) are merged
  into running per-token statistics, which is all the backward keeps (log-sum-exp and entropy);
- backward: each chunk's logits are recomputed with one large matmul and turned into their
  gradient; the hidden gradient accumulates over chunks in fp32, and the chunk's rows of the
  weight gradient come from one matmul over all tokens (fp32 accumulation inside the matmul,
  written once in the weight's dtype). No fp32 ``[V, H]`` buffer exists, and every matmul has
  ``T`` or ``chunk`` (not a small token slice) as its large dimensions.

Tensor parallelism (Megatron's vocab-parallel output layer): rank r of ``tp_group`` holds the
contiguous rows ``[r * V_local, (r + 1) * V_local)`` of the weight. One all-reduce MAX and one
all-reduce SUM combine the per-rank statistics into full-vocabulary values on every rank. In
backward the gradient with respect to ``hidden`` is a sum over the vocabulary, so the per-rank
partial sums are all-reduced (an all-reduce whose backward is an identity gives the wrong hidden
gradient under TP).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.distributed as dist

from or1_megatron.kernels import logprob_torch

IMPLS = ("auto", "torch", "triton")

# Elements of one fp32 logits chunk [T, columns]: ~16 MiB on CPU (cache-friendly, small next to
# the naive [T, V] logits) and ~128 MiB on GPU (for T = 8192, 4096 columns: matmuls large enough
# for full-speed cuBLAS while the chunk, its bf16 gradient and the fp32 hidden gradient stay
# well under the weight gradient itself).
_CHUNK_ELEMS = {"cuda": 1 << 25}
_CHUNK_ELEMS_DEFAULT = 1 << 22
# GPU chunks are a multiple of this many columns (tensor-core tiles), and at least one multiple.
_GPU_COLUMN_MULTIPLE = 256


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
def _has_fp32_out_mm(device: torch.device, dtype: torch.dtype) -> bool:
    # torch.mm(..., out_dtype=fp32) keeps bf16/fp16 logits in fp32 without an fp32 weight copy;
    # it exists on CUDA only (torch >= 2.8), so probe once per device and fall back to a cast.
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as an fp32 tensor, accumulated in fp32 whatever the input dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _has_fp32_out_mm(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


@functools.lru_cache(maxsize=None)
def _has_fp32_out_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    # torch.addmm(acc, a, b, out_dtype=fp32, out=acc) adds a bf16 product into an fp32 buffer
    # inside the matmul (beta = 1), with no fp32 temporary; CUDA only, like mm's out_dtype.
    # The probe starts from 1 so that an addmm ignoring what acc held (3 expected, 2 then) is
    # refused rather than silently keeping only the last chunk's hidden gradient.
    try:
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        a = torch.ones(2, 2, dtype=dtype, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3.0).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_mm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into the fp32 tensor ``acc``, accumulated in fp32 whatever the input dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _has_fp32_out_addmm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(_mm_fp32(a, b))


def vocab_chunk_columns(tokens: int, n_cols: int, device_type: str, vocab_chunk: int | None = None) -> int:
    """Columns per vocabulary chunk: ``vocab_chunk`` if given, else the largest chunk whose fp32
    ``[tokens, columns]`` logits fit the device's budget (a multiple of 256 on GPUs)."""
    if vocab_chunk is None:
        budget = _CHUNK_ELEMS.get(device_type, _CHUNK_ELEMS_DEFAULT)
        vocab_chunk = max(1, budget // max(tokens, 1))
        if device_type == "cuda":
            step = _GPU_COLUMN_MULTIPLE
            vocab_chunk = max(step, vocab_chunk // step * step)
    return max(1, min(vocab_chunk, n_cols))


def _chunk_targets(local_targets: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Targets relative to columns ``[start, stop)``; -1 where a token's target is elsewhere."""
    shifted = local_targets - start
    return torch.where((shifted >= 0) & (shifted < stop - start), shifted, torch.full_like(shifted, -1))


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
    vocab_chunk: int | None,
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
    if vocab_chunk is not None and (not isinstance(vocab_chunk, int) or vocab_chunk < 1):
        raise ValueError(f"vocab_chunk must be a positive int or None, got {vocab_chunk!r}")
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


def _rescale(m: torch.Tensor, s: torch.Tensor, q: torch.Tensor, big_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, q)`` of statistics taken about ``m`` re-expressed about the larger ``big_m``."""
    # A part with no columns has m = -inf and s = q = 0: shift it by 0, not NaN.
    m_safe = torch.where(torch.isfinite(m), m, big_m)
    scale = torch.exp(m_safe - big_m)
    return s * scale, scale * (q + (m_safe - big_m) * s)


def _merge_(acc: torch.Tensor, part: torch.Tensor) -> None:
    """Merge the statistics ``[4, T] = (m, s, q, zt)`` of a further vocabulary chunk into ``acc``."""
    big_m = torch.maximum(acc[0], part[0])
    s_a, q_a = _rescale(acc[0], acc[1], acc[2], big_m)
    s_p, q_p = _rescale(part[0], part[1], part[2], big_m)
    acc[0] = big_m
    acc[1] = s_a + s_p
    acc[2] = q_a + q_p
    acc[3] += part[3]  # zt is 0 in every chunk but the target's


def _combine(
    stats: torch.Tensor, tp_group: dist.ProcessGroup | None, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary (logprob, entropy, lse) from the per-rank stats ``[4, T] = (m, s, q, zt)``."""
    m, s, q, zt = stats.unbind(0)
    big_m = m.clone()
    if tp_size > 1:
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=tp_group)
    sums = torch.stack([*_rescale(m, s, q, big_m), zt])
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
    def forward(ctx, hidden, weight, targets, temperature, tp_group, valid_vocab_size, vocab_chunk, kernels):
        tp_rank, tp_size = _tp_rank_size(tp_group)
        v_local = weight.shape[0]
        offset = tp_rank * v_local
        # Global ids >= valid_vocab_size are Megatron's padding: a suffix of the vocabulary, so on
        # each rank the valid columns are a prefix and the padding is simply never computed.
        n_cols = max(0, min(v_local, valid_vocab_size - offset))
        local_targets = targets.long() - offset
        tokens = hidden.shape[0]
        columns = vocab_chunk_columns(tokens, n_cols, hidden.device.type, vocab_chunk)
        inv_temp = 1.0 / float(temperature)

        # The statistics of no columns at all (m = -inf, s = q = zt = 0), which is also what a rank
        # holding only padding contributes; every chunk is merged into them.
        stats = torch.zeros((4, tokens), dtype=torch.float32, device=hidden.device)
        stats[0].fill_(float("-inf"))
        for start in range(0, n_cols, columns):
            stop = min(start + columns, n_cols)
            logits = _mm_fp32(hidden, weight[start:stop].t())
            part = torch.stack(kernels.row_stats(logits, _chunk_targets(local_targets, start, stop), inv_temp))
            del logits
            _merge_(stats, part)
        logprob, entropy, lse = _combine(stats, tp_group, tp_size)

        ctx.save_for_backward(hidden, weight, local_targets, lse, entropy)
        ctx.tp_group, ctx.tp_size, ctx.n_cols = tp_group, tp_size, n_cols
        ctx.columns, ctx.inv_temp, ctx.kernels = columns, inv_temp, kernels
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
        if not (need_h or need_w):
            return (None,) * 8
        n_cols = ctx.n_cols
        grad_logprob = grad_logprob.float()
        grad_entropy = grad_entropy.float()
        # The hidden gradient sums over every chunk (and over TP ranks): fp32 until the end.
        grad_h32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        if need_w:
            grad_w[n_cols:].zero_()  # padding rows
        for start in range(0, n_cols, ctx.columns):
            stop = min(start + ctx.columns, n_cols)
            w_c = weight[start:stop]
            logits = _mm_fp32(hidden, w_c.t())
            dz = ctx.kernels.row_grad(
                logits,
                _chunk_targets(local_targets, start, stop),
                lse,
                entropy,
                grad_logprob,
                grad_entropy,
                ctx.inv_temp,
                weight.dtype,  # the matmuls below run in the model's dtype, accumulating in fp32
            )
            del logits
            if need_h:
                _add_mm_fp32_(grad_h32, dz, w_c)
            if need_w:
                torch.mm(dz.t(), hidden, out=grad_w[start:stop])
            del dz
        grad_h = None
        if need_h:
            if ctx.tp_size > 1:
                dist.all_reduce(grad_h32, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_h = grad_h32.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    valid_vocab_size: int | None = None,
    vocab_chunk: int | None = None,
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
        vocab_chunk: vocabulary columns per chunk of logits (each chunk covers all T tokens);
            None picks fp32 chunks of ~16 MiB (CPU) / ~128 MiB (GPU).
        impl: "triton", "torch", or "auto" (Triton row kernels on CUDA when importable).

    Returns:
        ``(logprob, entropy)``, fp32 ``[T]``, identical on every rank of ``tp_group``; both are
        differentiable with respect to ``hidden`` (full-vocabulary gradient on every rank) and
        ``weight`` (this rank's shard). Statistics are accumulated in fp32 for any input dtype.

    Memory besides the gradients themselves: one fp32 logits chunk, its gradient in the model's
    dtype, and the fp32 ``[T, H]`` accumulator of the hidden gradient. Precision: on CUDA the bf16
    matmul writes fp32 logits (``torch.mm(out_dtype=)``); elsewhere its output is rounded to bf16
    first, exactly as in the naive path. Checking ``targets`` costs one sync.
    """
    _, tp_size = _tp_rank_size(tp_group)
    valid = _check_inputs(hidden, weight, targets, temperature, tp_size, valid_vocab_size, vocab_chunk)
    kernels = _row_kernels(impl, hidden.device)
    # Autocast off: an ambient bf16 autocast would silently change the matmuls' dtypes.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _FusedLogprobEntropy.apply(
            hidden.contiguous(), weight.contiguous(), targets, float(temperature), tp_group, valid, vocab_chunk, kernels
        )
