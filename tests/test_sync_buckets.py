"""Bucket packing, the colocated payload and the disk writer, without engines or trainer ranks."""
from __future__ import annotations

import gc
import os

import pytest
import torch
from safetensors import safe_open

from or1_megatron.errors import ConfigError
from or1_megatron.rollout.serialization import SharedPayload, decode_named_tensors
from or1_megatron.sync.buckets import ALIGN, BucketBuffer, iter_buckets, named_groups
from or1_megatron.sync.transports import write_safetensors
from tests.policy_support import policy_config


def _stream(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (40, 10), (2, 2, 3), (1,), (300, 4), (9, 9)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.int64,
              torch.float32, torch.bfloat16]
    return [(f"t{i}", torch.randn(s, generator=g).to(d)) for i, (s, d) in enumerate(zip(shapes, dtypes))]


def _own_shm_files() -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"torch_{os.getpid()}_")]


def test_buckets_keep_order_values_and_the_size_bound():
    stream = _stream()
    buffer = BucketBuffer(2048)
    seen = []
    for bucket in iter_buckets(named_groups(stream), [buffer]):
        assert bucket.flat.numel() <= max(2048, bucket.nbytes)
        for meta in bucket.metadata:
            assert meta.start_idx % ALIGN == 0
        # copy out now: the next bucket reuses the buffer
        seen += [(name, t.clone()) for name, t in bucket.named_tensors()]
        if len(bucket.metadata) == 1 and bucket.nbytes > 2048:
            assert bucket.metadata[0].name == "t5"  # 4800 bytes: alone, in its own buffer
    assert [n for n, _ in seen] == [n for n, _ in stream]
    for (_, got), (_, want) in zip(seen, stream, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _send_and_decode_one_bucket() -> None:
    stream = _stream(1)
    buffer = BucketBuffer(1 << 16)
    [bucket] = list(iter_buckets(named_groups(stream), [buffer]))
    payload = SharedPayload.of_flattened(bucket.payload(), copies=2)
    for text in payload.texts:  # what each engine TP rank does
        decoded = decode_named_tensors(text, "flattened_bucket")
        assert [n for n, _ in decoded] == [n for n, _ in stream]
        assert all(torch.equal(got, want) for (_, got), (_, want) in zip(decoded, stream, strict=True))
    payload.release(delivered=True)
    SharedPayload.of_flattened(bucket.payload()).release(delivered=False)


def test_bucket_payload_decodes_and_leaves_no_shared_memory():
    _send_and_decode_one_bucket()
    gc.collect()
    assert _own_shm_files() == []


def test_disk_writer_produces_safetensors_that_load_back(tmp_path):
    stream = [(n, t) for n, t in _stream(2) if t.dtype != torch.int64] + [("i", torch.arange(5))]
    [bucket] = list(iter_buckets(named_groups(stream), [BucketBuffer(1 << 16, shared=False)]))
    path = tmp_path / "b.safetensors"
    write_safetensors(bucket, path)
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == sorted(n for n, _ in stream)
        for name, want in stream:
            assert torch.equal(f.get_tensor(name), want)


def test_sync_config_is_validated_by_key(tmp_path):
    from or1_megatron.tiny_model import make_tiny_qwen2

    hf = make_tiny_qwen2(tmp_path / "m")
    assert policy_config(hf).sync.transport == "colocated"
    with pytest.raises(ConfigError, match="sync.transport"):
        policy_config(hf, **{"sync.transport": "carrier_pigeon"})
    with pytest.raises(ConfigError, match="sync.pause_mode"):
        policy_config(hf, **{"sync.pause_mode": "stop"})
    with pytest.raises(ConfigError, match="sync.bucket_mb"):
        policy_config(hf, **{"sync.bucket_mb": 0})


def test_two_buffers_take_turns():
    stream = [(f"t{i}", torch.full((100,), float(i))) for i in range(6)]  # 400 bytes each
    buffers = [BucketBuffer(1024), BucketBuffer(1024)]
    buckets = list(iter_buckets(named_groups(stream), buffers))
    assert [len(b.metadata) for b in buckets] == [2, 2, 2]
    owners = [b.flat.data_ptr() for b in buckets]
    assert owners == [buffers[0].buffer.data_ptr(), buffers[1].buffer.data_ptr(),
                      buffers[0].buffer.data_ptr()]


def test_tensors_passed_by_reference_are_not_copied_and_go_early():
    """The trainer's parameters at TP1: views, never copied, in views-only buckets that take no
    buffer and go once a quarter of a buffer's worth has gathered."""
    params = torch.arange(1000, dtype=torch.float32)  # one "parameter" storage
    built = torch.full((100,), -1.0)  # a tensor the export built (a split qkv)
    stream = [("a", params[:100]), ("b", built), ("c", params[100:300].view(10, 20)),
              ("d", params[300:400])]
    storage = params.untyped_storage().data_ptr()
    buffer = BucketBuffer(4096)  # a quarter: 1024 bytes, reached by a + c (400 + 800)
    buckets = list(iter_buckets(named_groups(stream), [buffer],
                                lambda t: t.untyped_storage().data_ptr() == storage))
    assert [([m.name for m in b.metadata], [n for n, _ in b.views]) for b in buckets] == [
        ([], ["a", "c"]), (["b"], ["d"])]
    assert [b.nbytes for b in buckets] == [1200, 800]
    assert buckets[0].flat.numel() == 0  # no buffer taken
    assert buckets[0].views[0][1].data_ptr() == params.data_ptr()  # the parameter itself
    assert buckets[0].views[1][1].shape == (10, 20)
    assert torch.equal(buckets[1].named_tensors()[0][1], built)


def test_views_payload_is_read_in_place_and_leaves_no_shared_memory():
    params = torch.randn(64).share_memory_()
    views = [("a", params[:16].view(4, 4)), ("b", params[16:])]
    payload = SharedPayload.of_views(views, copies=2)
    for text in payload.texts:  # what each engine TP rank does
        decoded = decode_named_tensors(text, None)
        assert [n for n, _ in decoded] == ["a", "b"]
        assert all(torch.equal(got, want) for (_, got), (_, want) in zip(decoded, views, strict=True))
    params[0] = 42.0  # the payload reads the trainer's memory, not a copy
    assert decoded[0][1][0, 0] == 42.0
    payload.release(delivered=True)
    SharedPayload.of_views(views).release(delivered=False)
    del decoded, payload, params, views
    gc.collect()
    assert _own_shm_files() == []


def test_gathered_shards_are_assembled_in_place_a_parameter_per_bucket():
    """TP2 shards of a small Qwen2 straight into buckets: every HF tensor comes out exact, and
    the tensors of one parameter (q/k/v, gate/up) always share a bucket."""
    from or1_megatron.convert.hf_config import arch_from_dict, padded_vocab_size
    from or1_megatron.convert.qwen2 import Qwen2Mapping
    from or1_megatron.policy.export import StageParameter

    arch = arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100,
                           "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                           "num_attention_heads": 8, "num_key_value_heads": 4,
                           "max_position_embeddings": 64, "tie_word_embeddings": False,
                           "rope_theta": 10000.0, "rms_norm_eps": 1e-6})
    mapping = Qwen2Mapping(arch, padded_vocab_size(arch.vocab_size, 16, 2))
    g = torch.Generator().manual_seed(3)
    hf = {name: torch.randn(shape, generator=g) for name, shape in mapping.hf_shapes().items()}
    stream = [StageParameter(mapping, m, [mapping.to_mcore_shard(m, [hf[n] for n in m.hf_names],
                                                                 r, 2) for r in range(2)])
              for m in mapping.entries()]
    buffers = [BucketBuffer(8192), BucketBuffer(8192)]  # the embedding (12.8 kB) goes alone
    seen = {}
    for bucket in iter_buckets(iter(stream), buffers):
        names = [m.name for m in bucket.metadata]
        for param in stream:
            assert set(param.names) <= set(names) or not set(param.names) & set(names)
        seen.update((name, t.clone()) for name, t in bucket.named_tensors())
    assert list(seen) == mapping.hf_names()
    for name, want in hf.items():
        assert torch.equal(seen[name], want), name
