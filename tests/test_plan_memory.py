"""Policy memory per GPU against hand computation for DeepSeek-R1-Distill-Qwen-7B and -32B."""
import json
from pathlib import Path

import pytest

from or1_megatron.convert.hf_config import arch_from_dict
from or1_megatron.plan.memory import activation_bytes_per_token_layer, policy_memory, stage_params_per_rank

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
ARCH_7B = arch_from_dict(json.loads((MODELS / "deepseek-r1-distill-qwen-7b.json").read_text()))
ARCH_32B = arch_from_dict(json.loads((MODELS / "deepseek-r1-distill-qwen-32b.json").read_text()))
VOCAB = 152064  # already a multiple of 128 x 8


def layer_params(h, kv_dim, f):
    # q, k, v weights + biases, o, two norms, gate, up, down
    return h * h + h + 2 * (kv_dim * h + kv_dim) + h * h + 2 * h + 3 * h * f


@pytest.mark.parametrize("arch, total", [(ARCH_7B, 7_615_616_512), (ARCH_32B, 32_763_876_352)])
def test_single_rank_holds_every_parameter(arch, total):
    assert stage_params_per_rank(arch, 1, 1, VOCAB) == [total]
    mem = policy_memory(arch, tp=1, pp=1, dp=8, micro_batch_tokens=1, padded_vocab=VOCAB, recompute="full")
    assert (mem.weights, mem.grads, mem.optimizer) == (2 * total, 4 * total, int(12 * total / 8))


def test_7b_split_by_hand_at_tp2_pp2():
    h, f, kv = 3584, 18944, 512
    layer = layer_params(h, kv, f)
    assert 28 * layer + 2 * VOCAB * h + h == 7_615_616_512
    # per TP rank: matrices and q/k/v biases halve, the two norms per layer stay whole
    layer_tp2 = (layer - 2 * h) // 2 + 2 * h
    first = 14 * layer_tp2 + VOCAB * h // 2
    last = 14 * layer_tp2 + VOCAB * h // 2 + h  # + output layer shard and the final norm
    assert stage_params_per_rank(ARCH_7B, 2, 2, VOCAB) == [first, last]
    mem = policy_memory(ARCH_7B, tp=2, pp=2, dp=2, micro_batch_tokens=16384, padded_vocab=VOCAB,
                        recompute="none")
    assert mem.params == last and mem.optimizer == 6 * last


def test_activations_and_logits_by_hand():
    h, f, kv, heads, tokens = 5120, 27648, 1024, 40, 16384
    # bf16: norm in/out x2, rotated q and k, the qkv output, attention output, gate/up, SwiGLU
    # out; fp32: two 1/rms and one log-sum-exp per head
    attention = 2 * ((h + kv) + (h + 2 * kv) + h) + 4 * heads
    none = 2 * (4 * h + 3 * f) + 8 + attention
    selective = 2 * 2 * h + attention
    assert activation_bytes_per_token_layer(ARCH_32B, "none") == none
    assert activation_bytes_per_token_layer(ARCH_32B, "selective") == selective
    assert activation_bytes_per_token_layer(ARCH_32B, "full") == 2 * h
    plain = policy_memory(ARCH_32B, tp=8, pp=4, dp=1, micro_batch_tokens=tokens, padded_vocab=VOCAB,
                          recompute="none", fused_logprob=False)
    assert plain.activations == none * tokens // 8 * 16 * 4  # 16 layers per stage, 4 in flight
    assert plain.logits == 2 * 4 * tokens * VOCAB // 8 + 2 * VOCAB // 8 * h
    sel = policy_memory(ARCH_32B, tp=8, pp=4, dp=1, micro_batch_tokens=tokens, padded_vocab=VOCAB,
                        recompute="selective")
    # + one layer's recomputed MLP (norm output, gate/up, SwiGLU output) during backward
    assert sel.activations == selective * tokens // 8 * 16 * 4 + 2 * (h + 3 * f) * tokens // 8
    full = policy_memory(ARCH_32B, tp=8, pp=4, dp=1, micro_batch_tokens=tokens,
                         padded_vocab=VOCAB, recompute="full", logprob_chunk_elems=2**24)
    assert full.activations == 2 * h * tokens // 8 * 16 * 4 + none * tokens // 8
    # fused: one 2**24-element fp32 chunk and its bf16 gradient, the fp32 [tokens, h] accumulator
    assert full.logits == 6 * 2**24 + 4 * tokens * h + 2 * VOCAB // 8 * h
    assert full.total < sel.total < plain.total


def test_unknown_recompute_mode_is_named():
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full; got 'yes'"):
        activation_bytes_per_token_layer(ARCH_7B, "yes")
