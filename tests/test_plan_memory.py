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
    mem = policy_memory(arch, tp=1, pp=1, dp=8, micro_batch_tokens=1, padded_vocab=VOCAB, recompute=True)
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
                        recompute=False)
    assert mem.params == last and mem.optimizer == 6 * last


def test_activations_and_logits_by_hand():
    h, f, kv, tokens = 5120, 27648, 1024, 16384
    per_token_layer = 2 * (6 * h + 2 * kv + 3 * f)
    assert activation_bytes_per_token_layer(ARCH_32B) == per_token_layer
    full = policy_memory(ARCH_32B, tp=8, pp=4, dp=1, micro_batch_tokens=tokens, padded_vocab=VOCAB,
                         recompute=False, fused_logprob=False)
    assert full.activations == per_token_layer * tokens // 8 * 16 * 4
    assert full.logits == 2 * 4 * tokens * VOCAB // 8
    recomputed = policy_memory(ARCH_32B, tp=8, pp=4, dp=1, micro_batch_tokens=tokens,
                               padded_vocab=VOCAB, recompute=True, logprob_chunk_tokens=2048)
    assert recomputed.activations == (2 * h * tokens // 8 * 16 + per_token_layer * tokens // 8) * 4
    assert recomputed.logits == 2 * 4 * 2048 * VOCAB // 8
    assert recomputed.total < full.total
