"""Row kernels of the fused logprob/entropy in plain torch: the path for CPUs and anything else.

This module owns the two per-chunk row operations that `logprob.py` runs on a chunk of logits
`[C, n_cols]` (this rank's valid vocab columns only):

- `row_stats`: the local softmax statistics of each row (max, sum of exp, entropy term, target
  logit), which `logprob.py` combines across the tensor-parallel group;
- `row_grad`: d(loss)/d(h W^T) of the chunk given the global statistics, in the dtype the
  weight-gradient matmuls take.

It never sees more than one chunk, never talks to other ranks and never runs a matmul with the
weight. The Triton module `logprob_triton.py` implements the same two functions with the same
signatures; both are tested against the fp64 formula in `reference.py`.
"""
from __future__ import annotations

import torch


def row_stats(
    logits: torch.Tensor, local_targets: torch.Tensor, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local softmax statistics of each row of ``logits * inv_temp``, all fp32 ``[C]``.

    Returns ``(m, s, q, zt)``: ``m = max_j z_j``, ``s = sum_j exp(z_j - m)``,
    ``q = sum_j exp(z_j - m) * (z_j - m)`` and ``zt = z[target]`` (0 where the row's target is
    not on this rank, marked by ``local_targets == -1``). ``logits`` may be overwritten.
    """
    z = logits if logits.dtype == torch.float32 else logits.float()
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    on_rank = local_targets >= 0
    # Read the target logit from the same fp32 values that enter the sum, so logprob <= 0 holds
    # up to rounding of the sum (verl's kernel once returned logprob > 0 from a second matmul).
    zt = z.gather(1, local_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    zt = torch.where(on_rank, zt, torch.zeros_like(zt))
    m = z.amax(dim=1)
    z.sub_(m.unsqueeze(1))  # z - m <= 0: no overflow in exp, and q is computed without cancellation
    e = torch.exp(z)
    s = e.sum(dim=1)
    q = torch.linalg.vecdot(e, z)
    return m, s, q, zt


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
    """d(loss)/d(h W^T) for a chunk as an ``out_dtype`` tensor, computed in fp32 (over ``logits``
    when it is fp32, so ``logits`` may be overwritten).

    With ``z = h W^T / T``, ``logp = z - lse`` and ``p = exp(logp)`` over the full vocabulary:
    d logprob/dz_j = [j = target] - p_j and d entropy/dz_j = -p_j (z_j - E_p[z]) = -p_j (logp_j + H).
    ``grad_logprob`` and ``grad_entropy`` are the upstream fp32 ``[C]`` gradients.
    """
    z = logits if logits.dtype == torch.float32 else logits.float()
    a = (grad_logprob * inv_temp).unsqueeze(1)
    b = (grad_entropy * inv_temp).unsqueeze(1)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    z.sub_(lse.unsqueeze(1))  # log p
    p = torch.exp(z)
    # In place on the chunk: two chunk-sized buffers (log p, p) are all the backward holds.
    z.add_(entropy.unsqueeze(1)).mul_(b).add_(a).mul_(p).neg_()
    on_rank = local_targets >= 0
    rows = torch.nonzero(on_rank).squeeze(1)
    z[rows, local_targets[rows]] += a.squeeze(1)[rows]
    return z.to(out_dtype)
