"""The elementwise operations of the local layer spec: RMSNorm, SwiGLU and rotary embeddings.

RMSNorm and SwiGLU are autograd Functions that save only what their backward needs (the input,
and the per-token 1/rms of RMSNorm): eager torch would also keep an fp32 copy of every norm
input and both halves of every gate. What a layer keeps for backward is therefore the same on
every device, which is what the memory planner counts. Rotary embeddings are applied per token
from the packed batch's position ids, so packed sequences need no per-sequence loop and no
device-to-host copy of the boundaries in any layer.

On CUDA the elementwise bodies run torch.compile'd (one fused kernel each, no new compiled
dependency); elsewhere they run as plain torch, which is the reference the tests compare the
compiled versions against. ``OR1_COMPILE`` / `set_compile` change that: "never" (eager
everywhere, for debugging) or "always" (compiled on CPU too, as a test runs a train step).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

COMPILE_MODES = ("cuda", "always", "never")
# OR1_COMPILE=never runs every body eagerly (debugging); "always" compiles on CPU too (tests).
_COMPILE = {"mode": os.environ.get("OR1_COMPILE", "cuda")}
if _COMPILE["mode"] not in COMPILE_MODES:
    raise ValueError(f"OR1_COMPILE={_COMPILE['mode']!r}: must be one of {', '.join(COMPILE_MODES)}")


def set_compile(mode: str) -> None:
    """Where the elementwise bodies run torch.compile'd: "cuda" (the default), "always", "never"."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    _COMPILE["mode"] = mode


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    import torch._inductor.config as inductor_config

    # Compile in this process: the bodies are tiny, and a rank must not start a worker pool
    # (forked or spawned) next to its CUDA context and NCCL communicators.
    inductor_config.compile_threads = 1
    return torch.compile(fn, dynamic=True)


def _body(fn: Callable, device: torch.device, force_compile: bool = False) -> Callable:
    mode = _COMPILE["mode"]
    if force_compile or mode == "always" or (mode == "cuda" and device.type == "cuda"):
        return _compiled(fn)
    return fn


# -- RMSNorm ---------------------------------------------------------------------------------

def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Hugging Face's Qwen2RMSNorm: fp32 statistics, cast to the input dtype, then scale.
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rstd


def _rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    normed = x.float() * rstd
    grad_weight = (grad.float() * normed.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    grad_normed = (grad * weight).float()
    # d(h * rstd)/dh with rstd = mean(h^2)^-1/2: rstd * (g - n * mean(g * n)).
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, force_compile):
        out, rstd = _body(_rms_norm_forward, x.device, force_compile)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.force_compile = force_compile
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _body(_rms_norm_backward, x.device, ctx.force_compile)(
            grad.contiguous(), x, weight, rstd)
        return grad_x, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, force_compile: bool = False) -> torch.Tensor:
    """Qwen2's RMSNorm over the last dimension; saves ``x`` and the fp32 ``[..., 1]`` 1/rms only."""
    return _RMSNorm.apply(x, weight, float(eps), force_compile)


# -- SwiGLU ----------------------------------------------------------------------------------

def _swiglu_forward(y: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(y, 2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(y.dtype)


def _swiglu_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gate, up = (part.float() for part in torch.chunk(y, 2, dim=-1))
    sig = torch.sigmoid(gate)
    g = grad.float()
    grad_gate = g * up * sig * (1 + gate * (1 - sig))  # silu'(a) = s(a) (1 + a (1 - s(a)))
    grad_up = g * gate * sig
    return torch.cat((grad_gate, grad_up), dim=-1).to(y.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, force_compile):
        ctx.save_for_backward(y)
        ctx.force_compile = force_compile
        return _body(_swiglu_forward, y.device, force_compile)(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _body(_swiglu_backward, y.device, ctx.force_compile)(grad.contiguous(), y), None


def swiglu(y: torch.Tensor, force_compile: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of ``y = [..., 2f] = cat(gate, up)`` (megatron's gated fc1 layout);
    saves ``y`` only."""
    if y.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate and up halves), got {tuple(y.shape)}")
    return _SwiGLU.apply(y, force_compile)


# -- rotary embeddings -----------------------------------------------------------------------

def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[t, 1, head_dim]`` for the flat ``[t]`` positions (non-interleaved
    halves, as megatron and Hugging Face lay them out), computed in fp32 and cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.reshape(-1, 1).float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = torch.chunk(x, 2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, force_compile: bool = False) -> torch.Tensor:
    """Rotate ``x [t, heads, head_dim]`` by per-token angles (autograd keeps cos/sin, not x)."""
    return _body(_rotate, x.device, force_compile)(x, cos, sin)
