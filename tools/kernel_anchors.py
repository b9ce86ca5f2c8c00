"""Other projects' fused linear cross-entropy kernels, as log-prob functions for side-by-side runs.

`tools/profile_kernels.py --compare liger,cce` times these beside or1's fused kernel. Each anchor
turns ``hidden [T, H]``, ``weight [V, H]`` and ``targets [T]`` into per-token log-probabilities
with per-token gradients (``reduction="none"``), which is what a PPO loss needs; none of them
computes the entropy, so they do less work than or1's kernel. They are optional: an anchor whose
package is missing, or that cannot run on the profiled device, is reported and skipped.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

ANCHORS = ("liger", "cce")


def _liger() -> LogprobFn:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    def logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = hidden if temperature == 1.0 else hidden / temperature
        # positional (autograd Functions take no keywords), in liger-kernel 0.8.5's order (the
        # version ../shared/gpu/pack.sh carries): bias, ce_weight, ignore_index,
        # lse_square_scale, label_smoothing, reduction
        out = LigerFusedLinearCrossEntropyFunction.apply(scaled, weight, targets, None, None, -100, 0.0, 0.0, "none")
        loss = out[0] if isinstance(out, tuple) else out  # (loss, z_loss, accuracy, predicted) in 0.8.5
        if loss.shape != targets.shape:
            raise RuntimeError(f"Liger returned a loss of shape {tuple(loss.shape)}, not per token: "
                               "this liger-kernel's argument order differs from 0.8.5's")
        return -loss

    return logprob


def _cce() -> LogprobFn:
    from cut_cross_entropy import linear_cross_entropy

    def logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = hidden if temperature == 1.0 else hidden / temperature
        return -linear_cross_entropy(scaled, weight, targets, reduction="none")

    return logprob


_LOADERS = {"liger": _liger, "cce": _cce}


def load_anchor(name: str, device: torch.device, tp: int) -> tuple[LogprobFn | None, str]:
    """The anchor's log-prob function, or None and the reason it cannot run here."""
    if name not in _LOADERS:
        raise ValueError(f"unknown anchor {name!r}; known: {', '.join(ANCHORS)}")
    if device.type != "cuda":
        return None, "needs a CUDA device (its kernels are Triton on GPU only)"
    if tp != 1:
        return None, "has no vocab-parallel (TP) mode"
    try:
        return _LOADERS[name](), ""
    except ImportError as exc:
        return None, f"not importable ({exc})"
