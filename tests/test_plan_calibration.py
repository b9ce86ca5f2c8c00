"""The planner's activation memory against what the real policy keeps for backward.

`plan.memory` predicts, per recompute mode, the bytes each transformer layer saves per token;
here the local-spec model (megatron-core on CPU, bf16) runs a forward and `plan.measure` counts
the storages autograd really saved. Two depths are measured so that the embedding and the final
norm cancel out: (bytes at 4 layers - bytes at 2 layers) / 2 is one layer's share.

The planner describes the GPU's varlen attention, whose output buffer is also the output
projection's input. On CPU the attention runs per sequence and its outputs are copied into one
buffer for the projection: one more [tokens, h] bf16 buffer per layer, added here. With it the
prediction must match to 2% (the GPU calibration in tools/bench_policy.py is held to 15% of the
peak, allocator included).
"""
from __future__ import annotations

import pytest
import torch

from or1_megatron.convert.hf_config import load_arch
from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.plan.measure import saved_activation_bytes
from or1_megatron.plan.memory import activation_bytes_per_token_layer
from or1_megatron.policy.packing import pack
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config

# Qwen2.5-like proportions (FFN ~5.5x hidden, GQA), small enough for a CPU forward.
SHAPE = dict(hidden_size=128, intermediate_size=704, num_heads=4, num_kv_heads=2, vocab_size=512,
             max_position_embeddings=4096)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    return {layers: make_tiny_qwen2(root / f"l{layers}", num_layers=layers, **SHAPE) for layers in (2, 4)}


def rank_saved_bytes(rank, world, hf_dir, recompute, lengths):
    from or1_megatron.policy.worker import PolicyWorker

    config = policy_config(hf_dir, **{"model.dtype": "bf16", "model.recompute": recompute,
                                      "batch.micro_batch_tokens": 2048,
                                      "batch.max_prompt_length": 1024, "batch.max_response_length": 1024})
    worker = PolicyWorker(config)
    model = worker.unwrapped
    model.train()
    g = torch.Generator().manual_seed(0)
    mb = pack([torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths], list(range(len(lengths))))

    def forward():
        return model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None,
                     packed_seq_params=mb.packed_seq_params)

    _, saved = saved_activation_bytes(forward, exclude=model.parameters())
    return saved


def measured_per_token_layer(models, recompute: str, lengths=(300, 212)) -> float:
    tokens = sum(lengths)
    saved = {layers: run_forked(rank_saved_bytes, 1, path, recompute, lengths, timeout_s=120)[0]
             for layers, path in models.items()}
    return (saved[4] - saved[2]) / 2 / tokens


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_planner_activations_match_the_measured(models, recompute):
    arch = load_arch(models[2])
    cpu_attention_copy = 0 if recompute == "full" else 2 * arch.hidden_size
    predicted = activation_bytes_per_token_layer(arch, recompute) + cpu_attention_copy
    measured = measured_per_token_layer(models, recompute)
    assert measured > 0
    assert abs(predicted / measured - 1) <= 0.02, (recompute, predicted, measured)


def test_recompute_modes_really_save_memory(models):
    none, selective, full = (measured_per_token_layer(models, mode) for mode in ("none", "selective", "full"))
    assert full < selective / 4 and selective < none / 2, (none, selective, full)
