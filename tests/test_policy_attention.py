"""The local spec's packed attention: numbers against a plain fp64 rotary + softmax attention
per sequence, and memory that grows linearly with sequence length (what took a 1.5B model to a
117 GiB peak on a GPU was SDPA's math kernel keeping [heads, L, L] fp32 scores per layer)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from or1_megatron.config.schema import ModelConfig, ParallelConfig
from or1_megatron.convert.hf_config import load_arch
from or1_megatron.plan.measure import saved_activation_bytes
from or1_megatron.policy.fused_ops import rope_cos_sin
from or1_megatron.policy.model import PackedCoreAttention, transformer_config
from or1_megatron.policy.packing import pack
from or1_megatron.tiny_model import make_tiny_qwen2

HEADS, GROUPS, HEAD_DIM = 8, 2, 16
THETA = 1e4


def with_rope(mb):
    """The micro-batch's packed-sequence params with the rotary angles the model attaches."""
    return replace(mb.packed_seq_params,
                   rotary_cos_sin=rope_cos_sin(mb.position_ids, HEAD_DIM, THETA, torch.float32))


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    hf_dir = make_tiny_qwen2(tmp_path_factory.mktemp("tiny"), hidden_size=HEADS * HEAD_DIM,
                             num_heads=HEADS, num_kv_heads=GROUPS, max_position_embeddings=4096)
    config = transformer_config(load_arch(hf_dir), ModelConfig(hf_path=str(hf_dir), dtype="fp32"),
                                ParallelConfig())
    return PackedCoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")


def rotate(x, positions):
    """Hugging Face's rotary embedding (rotate_half) of x [L, heads, d] at the given positions, fp64."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = torch.outer(positions.double(), inv_freq)
    cos, sin = (f(torch.cat((angles, angles), -1))[:, None, :] for f in (torch.cos, torch.sin))
    half = HEAD_DIM // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def reference(q, k, v, bounds):
    """Rotary embedding restarting at every sequence, then causal softmax attention of each
    sequence with itself, fp64, K/V heads shared by groups."""
    q, k, v = (x.double() for x in (q, k, v))
    k, v = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (k, v))
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        positions = torch.arange(end - start)
        qs, ks, vs = (x[start:end] for x in (q, k, v))
        qs, ks = rotate(qs, positions), rotate(ks, positions)
        qs, ks, vs = (x.transpose(0, 1) for x in (qs, ks, vs))  # [h, L, d]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(HEAD_DIM)
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[start:end] = (weights @ vs).transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def test_packed_attention_equals_plain_attention_per_sequence(attention):
    lengths = (7, 1, 12, 5)
    mb = pack([list(range(n)) for n in lengths], [0, 1, 2, 3], pad_to_multiple=4)
    t = mb.num_tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(t, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(t, GROUPS, HEAD_DIM, generator=g, requires_grad=True)
    out = attention(q, k, v, None, packed_seq_params=with_rope(mb))
    expected = reference(q, k, v, list(mb.host_bounds))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    # gradients too (the reference differentiates through fp64)
    upstream = torch.randn(out.shape, generator=g)
    ours = torch.autograd.grad(out, (q, k, v), upstream)
    theirs = torch.autograd.grad(expected, (q, k, v), upstream.double())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def saved_bytes(attention, length: int) -> int:
    mb = pack([list(range(length))], [0])
    q = torch.randn(length, HEADS, HEAD_DIM, requires_grad=True)
    k = torch.randn(length, GROUPS, HEAD_DIM, requires_grad=True)
    v = torch.randn(length, GROUPS, HEAD_DIM, requires_grad=True)
    return saved_activation_bytes(attention, q, k, v, None, packed_seq_params=with_rope(mb))[1]


def test_saved_tensors_grow_linearly_with_sequence_length(attention):
    sizes = {n: saved_bytes(attention, n) for n in (256, 512, 1024)}
    # Linear: doubling L doubles what backward keeps (quadratic would quadruple it: 4x).
    assert sizes[512] / sizes[256] < 2.2 and sizes[1024] / sizes[512] < 2.2, sizes
    # and no [heads, L, L] score matrix hides in it
    assert sizes[1024] < HEADS * 1024 * 1024 * 4, sizes
