"""The local spec's fused RMSNorm, SwiGLU and per-token RoPE against independent references:
plain-torch autograd of Hugging Face's formulas, and megatron's own packed ('thd') RoPE.

Also what each keeps for backward (the activation memory the planner counts), and that the
torch.compile'd bodies the GPU runs give the eager results (compiled here with inductor's CPU
backend, which is what the GPU path uses minus the code generator)."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.plan.measure import saved_activation_bytes
from or1_megatron.policy.fused_ops import apply_rope, rms_norm, rope_cos_sin, swiglu
from or1_megatron.policy.packing import pack


def hf_rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def plain_swiglu(y):
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


def _grads(fn, inputs, upstream):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, upstream))


def _saved_bytes(fn, *inputs) -> int:
    return saved_activation_bytes(fn, *inputs)[1]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_hugging_face_values_and_gradients(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(13, 1, 48, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    upstream = torch.randn(13, 1, 48, generator=g).to(dtype)
    ours = _grads(lambda a, w: rms_norm(a, w, 1e-6), (x, weight), upstream)
    # The reference differentiates the formula in fp64: our fp32 statistics must agree with it.
    theirs = _grads(lambda a, w: hf_rms_norm(a.double(), w.double(), 1e-6),
                    (x, weight), upstream.double())
    for name, a, b in zip(("out", "grad_x", "grad_weight"), ours, theirs, strict=True):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b.double(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol, msg=name)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu_matches_plain_silu_gate(dtype, tol):
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(9, 1, 2 * 20, generator=g) * 4).to(dtype)
    upstream = torch.randn(9, 1, 20, generator=g).to(dtype)
    ours = _grads(swiglu, (y,), upstream)
    theirs = _grads(lambda a: plain_swiglu(a.double()), (y,), upstream.double())
    for name, a, b in zip(("out", "grad_y"), ours, theirs, strict=True):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b.double(), atol=tol * max(1.0, b.abs().max().item()), rtol=tol, msg=name)


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.zeros(2, 5))


def test_norm_and_gate_keep_only_their_inputs_for_backward():
    tokens, hidden, ffn = 64, 32, 80
    x = torch.randn(tokens, 1, hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(hidden, dtype=torch.bfloat16, requires_grad=True)  # counted: not excluded
    y = torch.randn(tokens, 1, 2 * ffn, dtype=torch.bfloat16, requires_grad=True)
    # RMSNorm: x (bf16) + weight + fp32 1/rms per token; eager HF keeps fp32 copies on top.
    assert _saved_bytes(rms_norm, x, weight, 1e-6) == 2 * tokens * hidden + 2 * hidden + 4 * tokens
    assert _saved_bytes(hf_rms_norm, x, weight, 1e-6) > 3 * tokens * hidden * 2
    # SwiGLU: y only; eager keeps gate, up and silu(gate) as well.
    assert _saved_bytes(swiglu, y) == 2 * tokens * 2 * ffn
    assert _saved_bytes(plain_swiglu, y) > 2 * tokens * 2 * ffn


def rank_rope_against_megatron(rank, world):
    """In a forked rank: megatron's rotary module needs the CPU patches, which belong to ranks."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from or1_megatron.policy.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    head_dim, heads, theta = 16, 3, 1e6
    mb = pack([list(range(n)) for n in (5, 11, 1, 7)], [0, 1, 2, 3], pad_to_multiple=8)
    x = torch.randn(mb.num_tokens, heads, head_dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_cos_sin(mb.position_ids, head_dim, theta, torch.float32)
    ours = apply_rope(x, cos, sin)
    freqs = RotaryEmbedding(head_dim, rotary_percent=1.0, rotary_base=int(theta),
                            use_cpu_initialization=True)(max(mb.seq_lengths) + 8, packed_seq=True)
    no_context_parallel = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    theirs = _apply_rotary_pos_emb_thd(x, mb.cu_seqlens, freqs, cp_group=no_context_parallel)
    return x, ours, theirs, list(mb.host_bounds[:-1])


def test_per_token_rope_equals_megatrons_packed_rope():
    x, ours, theirs, starts = run_forked(rank_rope_against_megatron, 1, timeout_s=120)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[starts], x[starts])  # position 0 of every sequence is not rotated


def rank_compiled_against_eager(rank, world):
    """In a forked rank: torch.compile's state (dynamo, inductor) stays out of the test process."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(21, 1, 32, generator=g)
    weight = 1 + 0.1 * torch.randn(32, generator=g)
    y = torch.randn(21, 1, 2 * 24, generator=g)
    cos, sin = rope_cos_sin(torch.arange(21), 32, 1e4, torch.float32)
    cases = {
        "rms_norm": (lambda a, w, **kw: rms_norm(a, w, 1e-6, **kw), (x, weight)),
        "swiglu": (lambda a, **kw: swiglu(a, **kw), (y,)),
        "rope": (lambda a, **kw: apply_rope(a.reshape(21, 1, 32), cos, sin, **kw), (x,)),
    }
    out = {}
    for name, (fn, inputs) in cases.items():
        upstream = torch.randn_like(fn(*inputs))
        eager = _grads(fn, inputs, upstream)
        compiled = _grads(lambda *a, fn=fn: fn(*a, force_compile=True), inputs, upstream)
        out[name] = (compiled, eager)
    return out


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_bodies_give_the_eager_results():
    for name, (compiled, eager) in run_forked(rank_compiled_against_eager, 1, timeout_s=300)[0].items():
        for a, b in zip(compiled, eager, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def rank_train_step_compiled(rank, world, hf_dir, mode):
    from or1_megatron.policy.export import iter_stage_hf_tensors
    from or1_megatron.policy.fused_ops import set_compile
    from or1_megatron.policy.worker import PolicyWorker
    from tests.policy_support import policy_config, random_sequences

    set_compile(mode)
    worker = PolicyWorker(policy_config(hf_dir, **{"model.recompute": "selective"}))
    sequences = random_sequences(300, (7, 12, 5, 9))

    def nll(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / 29 - 0.1 * (entropy * mb.target_mask).sum() / 29, {}

    metrics = worker.train_step(sequences, nll)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # what dynamo really compiled in this rank
    return metrics, dict(iter_stage_hf_tensors(worker.unwrapped, worker.mapping, worker.layout)), graphs


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_a_train_step_with_compiled_bodies_equals_the_eager_one(tmp_path):
    # What GPU ranks run (compiled norms, SwiGLU and RoPE inside megatron's layers and its
    # selective recompute), compiled here with inductor's CPU backend.
    from or1_megatron.tiny_model import make_tiny_qwen2

    hf_dir = make_tiny_qwen2(tmp_path / "hf", vocab_size=300)
    eager_metrics, eager, no_graphs = run_forked(rank_train_step_compiled, 1, hf_dir, "never", timeout_s=300)[0]
    compiled_metrics, compiled, graphs = run_forked(rank_train_step_compiled, 1, hf_dir, "always", timeout_s=600)[0]
    assert no_graphs == 0 and graphs >= 5  # rms_norm and swiglu forward/backward, rope
    assert compiled_metrics["loss"] == pytest.approx(eager_metrics["loss"], abs=1e-5)
    assert compiled_metrics["grad_norm"] == pytest.approx(eager_metrics["grad_norm"], rel=1e-4)
    for name, want in eager.items():
        torch.testing.assert_close(compiled[name], want, atol=1e-5, rtol=1e-4, msg=name)
