"""Row kernels of the fused logprob/entropy in Triton: the GPU path.

Same contract as `logprob_torch.py` (`row_stats`, `row_grad`), one program per row of the
logits chunk, looping over the vocabulary in blocks of ``BLOCK_V`` columns:

- the forward reads each logit once (bf16 or fp32) and keeps an online, per-lane softmax state
  (max, sum of exp, entropy term) in fp32 registers, so no fp32 copy of the chunk is made;
- the backward reads each logit once and writes its gradient once, in the dtype of the
  weight-gradient matmuls (in place when that is the logits' own fp32).

The matmuls stay in cuBLAS (`logprob.py`); these kernels replace the memory-bound softmax,
gather and entropy passes. Importing this module defines the kernels: set ``TRITON_INTERPRET=1``
before the first import to run them on CPU tensors (tests do so in a fresh subprocess).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# A finite "minus infinity" for the running max: exp(NEG - m) is 0 and (NEG - m) * 0 is 0,
# where -inf would give NaN in the rescaling of lanes that have seen no column yet.
_NEG = -1.0e30


# triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. at this module's import:
# record that, since setting the variable later does not change the kernels below.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Tests set this to force several vocabulary blocks per row (the online-rescaling path).
block_v_override: int | None = None


def _block_v(n_cols: int) -> int:
    if block_v_override is not None:
        return block_v_override
    # Under the interpreter each loop iteration costs milliseconds: one block covering the row.
    if _INTERPRETED:
        return triton.next_power_of_2(max(n_cols, 16))
    return min(4096, triton.next_power_of_2(max(n_cols, 16)))


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    m_ptr,
    s_ptr,
    q_ptr,
    zt_ptr,
    n_cols,
    inv_temp,
    NEG: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m_l = tl.full((BLOCK_V,), NEG, tl.float32)
    s_l = tl.zeros((BLOCK_V,), tl.float32)
    q_l = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        # Masked lanes read NEG: exp(NEG - m) never overflows, and tl.where drops them anyway.
        x = tl.where(mask, x, NEG)
        m_new = tl.maximum(m_l, x)
        scale = tl.exp(m_l - m_new)
        e = tl.where(mask, tl.exp(x - m_new), 0.0)
        # q = sum e (z - m): moving the reference from m_l to m_new adds (m_l - m_new) * s.
        q_l = scale * (q_l + (m_l - m_new) * s_l) + tl.where(mask, e * (x - m_new), 0.0)
        s_l = scale * s_l + e
        m_l = m_new
    m = tl.max(m_l, axis=0)
    scale = tl.exp(m_l - m)
    s = tl.sum(scale * s_l, axis=0)
    q = tl.sum(scale * (q_l + (m_l - m) * s_l), axis=0)
    t = tl.load(targets_ptr + row)
    on_rank = (t >= 0) & (t < n_cols)
    # The same load and scaling as in the loop: zt is bit-identical to the value summed above.
    zt = tl.load(base + tl.where(on_rank, t, 0), mask=on_rank, other=0.0).to(tl.float32) * inv_temp
    zt = tl.where(on_rank, zt, 0.0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(q_ptr + row, q)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _row_grad_kernel(
    logits_ptr,
    stride_row,
    out_ptr,
    out_stride_row,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    n_cols,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    out = out_ptr + row * out_stride_row
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    a = tl.load(glp_ptr + row) * inv_temp
    b = tl.load(gent_ptr + row) * inv_temp
    t = tl.load(targets_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = x - lse
        p = tl.exp(logp)
        d = tl.where(cols == t, a, 0.0) - p * (a + b * (logp + ent))
        tl.store(out + cols, d.to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_v: int) -> int:
    # Three fp32 vectors of BLOCK_V lanes live in registers: spread large blocks over 8 warps.
    return 8 if block_v >= 2048 else 4


def _check(logits: torch.Tensor) -> None:
    if logits.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got device {logits.device}); "
            "set TRITON_INTERPRET=1 before importing or1_megatron.kernels.logprob_triton to run "
            "the kernels on CPU"
        )
    if logits.stride(1) != 1:
        raise ValueError("logits chunk must be contiguous along the vocabulary dimension")


def row_stats(
    logits: torch.Tensor, local_targets: torch.Tensor, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of `logprob_torch.row_stats` (does not modify ``logits``)."""
    _check(logits)
    rows, n_cols = logits.shape
    out = torch.empty((4, rows), dtype=torch.float32, device=logits.device)
    block_v = _block_v(n_cols)
    _row_stats_kernel[(rows,)](
        logits,
        logits.stride(0),
        local_targets,
        out[0],
        out[1],
        out[2],
        out[3],
        n_cols,
        float(inv_temp),
        NEG=_NEG,
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return out[0], out[1], out[2], out[3]


def row_grad(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor,
    inv_temp: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton version of `logprob_torch.row_grad` (over ``logits`` when ``out_dtype`` is its dtype)."""
    _check(logits)
    rows, n_cols = logits.shape
    block_v = _block_v(n_cols)
    out = logits if out_dtype == logits.dtype else torch.empty(logits.shape, dtype=out_dtype, device=logits.device)
    _row_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        local_targets,
        lse.contiguous(),
        entropy.contiguous(),
        grad_logprob.contiguous(),
        grad_entropy.contiguous(),
        n_cols,
        float(inv_temp),
        BLOCK_V=block_v,
        num_warps=_num_warps(block_v),
    )
    return out
