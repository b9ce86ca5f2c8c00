"""The one HF <-> Megatron Qwen2 mapping: shard/gather identity, real model sizes, named errors."""
import json
from pathlib import Path

import pytest
import torch

from or1_megatron.convert.hf_config import arch_from_dict
from or1_megatron.convert.qwen2 import Qwen2Mapping, canonical_mcore_name, check_names
from or1_megatron.errors import CheckpointError, ModelConfigError
from or1_megatron.convert.hf_config import padded_vocab_size

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
QWEN_7B = json.loads((MODELS / "deepseek-r1-distill-qwen-7b.json").read_text())
QWEN_32B = json.loads((MODELS / "deepseek-r1-distill-qwen-32b.json").read_text())
SMALL = dict(QWEN_7B, vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("raw, tensors, params", [(QWEN_7B, 339, 7_615_616_512), (QWEN_32B, 771, 32_763_876_352)])
def test_real_model_sizes(raw, tensors, params):
    arch = arch_from_dict(raw)
    assert (arch.rope_theta, arch.rms_norm_eps) == (raw["rope_theta"], raw["rms_norm_eps"])
    mapping = Qwen2Mapping(arch, padded_vocab_size(arch.vocab_size, 128, 8))
    shapes = mapping.hf_shapes()
    assert len(shapes) == tensors
    assert sum(torch.Size(s).numel() for s in shapes.values()) == params


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_gather_is_identity(tp):
    arch = arch_from_dict(SMALL)
    mapping = Qwen2Mapping(arch, padded_vocab_size(arch.vocab_size, 16, tp))
    g = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=g) for name, shape in mapping.hf_shapes().items()}
    for m in mapping.entries():
        shards = [mapping.to_mcore_shard(m, [hf[n] for n in m.hf_names], r, tp) for r in range(tp)]
        for shard in shards:
            assert tuple(shard.shape) == mapping.mcore_shard_shape(m, tp)
        for name, back in zip(m.hf_names, mapping.to_hf(m, shards), strict=True):
            assert torch.equal(back, hf[name]), name
        # Straight into one flat buffer, as the weight sync packs a bucket.
        sizes = [torch.Size(s).numel() for s in m.hf_shapes]
        flat = torch.full((sum(sizes),), float("nan"))
        outs = [part.view(shape) for part, shape in zip(flat.split(sizes), m.hf_shapes)]
        mapping.to_hf_into(m, shards, outs)
        for name, out in zip(m.hf_names, outs, strict=True):
            assert torch.equal(out, hf[name]), name
        if tp == 1 and m.kind != "qkv":  # views of the shard: passed by reference, never copied
            assert all(t.untyped_storage().data_ptr() == shards[0].untyped_storage().data_ptr()
                       for t in mapping.to_hf(m, shards))


def test_qkv_layout_is_per_query_group():
    # 8 heads, 4 groups, head_dim 4: group g of TP rank r holds [q heads 2g, 2g+1; k_g; v_g].
    arch = arch_from_dict(SMALL)
    mapping = Qwen2Mapping(arch, 112)
    m = mapping.get("decoder.layers.0.self_attention.linear_qkv.bias")
    q = torch.arange(32.0)
    k = torch.arange(100.0, 116.0)
    v = torch.arange(200.0, 216.0)
    shard1 = mapping.to_mcore_shard(m, [q, k, v], tp_rank=1, tp_size=2)
    # rank 1 holds groups 2 and 3
    expected = torch.cat([q[16:24], k[8:12], v[8:12], q[24:32], k[12:16], v[12:16]])
    assert torch.equal(shard1, expected)


def test_gate_up_layout_per_tp_rank():
    arch = arch_from_dict(SMALL)
    mapping = Qwen2Mapping(arch, 112)
    m = mapping.get("decoder.layers.1.mlp.linear_fc1.weight")
    gate = torch.arange(48.0)[:, None].expand(48, 32)
    up = gate + 1000
    shard = mapping.to_mcore_shard(m, [gate, up], tp_rank=1, tp_size=2)
    assert torch.equal(shard, torch.cat([gate[24:], up[24:]]))


def test_vocab_padding_rows_are_zero_and_dropped():
    arch = arch_from_dict(SMALL)
    mapping = Qwen2Mapping(arch, 128)
    m = mapping.get("embedding.word_embeddings.weight")
    emb = torch.randn(100, 32)
    shards = [mapping.to_mcore_shard(m, [emb], r, 2) for r in range(2)]
    assert torch.count_nonzero(shards[1][100 - 64:]) == 0
    assert torch.equal(mapping.to_hf(m, shards)[0], emb)


def test_wrong_shapes_and_names_are_named():
    arch = arch_from_dict(SMALL)
    mapping = Qwen2Mapping(arch, 128)
    m = mapping.get("decoder.layers.0.mlp.linear_fc2.weight")
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight: shape \(32, 47\)"):
        mapping.to_mcore_shard(m, [torch.zeros(32, 47)], 0, 1)
    with pytest.raises(CheckpointError, match="missing tensors: b; unexpected tensors: c"):
        check_names(["a", "c"], ["a", "b"], where="ckpt")
    with pytest.raises(CheckpointError, match="more than once: a"):
        check_names(["a", "a"], ["a"], where="ckpt")


def test_te_and_stage_local_names_map_to_global_names():
    assert (canonical_mcore_name("module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", 4)
            == "decoder.layers.5.input_layernorm.weight")
    assert canonical_mcore_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_mcore_name("output_layer.weight", 3) == "output_layer.weight"


def test_unsupported_configs_are_refused():
    with pytest.raises(ModelConfigError, match="LlamaForCausalLM"):
        arch_from_dict(dict(QWEN_7B, architectures=["LlamaForCausalLM"]))
    with pytest.raises(ModelConfigError, match="intermediate_size"):
        arch_from_dict({k: v for k, v in QWEN_7B.items() if k != "intermediate_size"})
    nested = {k: v for k, v in QWEN_32B.items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    assert arch_from_dict(nested).rope_theta == 1e6  # transformers 5 layout
