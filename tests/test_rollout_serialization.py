"""Payload encoding/decoding, the allow-list, buckets, shared-memory hygiene, request parsing."""
from __future__ import annotations

import base64
import gc
import os
import pickle

import pytest
import torch

from or1_megatron.rollout import protocol
from or1_megatron.rollout.serialization import (
    DecodedPayload,
    FlattenedTensorMetadata,
    KeptMappings,
    PayloadError,
    SharedPayload,
    decode_named_tensors,
    decode_payload,
    flatten_bucket,
    split_into_buckets,
    unflatten_bucket,
)

NAMED = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16)),
         ("c.idx", torch.tensor([1, 2, 3])), ("d.empty", torch.zeros(0, 2))]


def _own_shm_files() -> list[str]:
    gc.collect()
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"torch_{os.getpid()}_")]


def _b64(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def test_flattened_bucket_round_trip_keeps_dtypes_and_shapes():
    bucket = flatten_bucket(NAMED)
    assert bucket["flattened_tensor"].dtype == torch.uint8
    meta = bucket["metadata"][1]
    assert (meta.start_idx, meta.end_idx, meta.numel) == (48, 58, 10)  # byte offsets, as SGLang
    for (name, tensor), (name2, tensor2) in zip(NAMED, unflatten_bucket(bucket), strict=True):
        assert name == name2 and tensor.dtype == tensor2.dtype and torch.equal(tensor, tensor2)


@pytest.mark.parametrize("load_format", ["flattened_bucket", None])
def test_payload_decodes_and_leaves_no_shared_memory(load_format):
    with_payload = SharedPayload(NAMED, load_format)
    decoded = decode_named_tensors(with_payload.texts[0], load_format)
    assert [(n, t.tolist()) for n, t in decoded] == [(n, t.tolist()) for n, t in NAMED]
    with_payload.release(delivered=True)
    del decoded, with_payload
    assert _own_shm_files() == []


def test_undelivered_payload_releases_its_shared_memory():
    payload = SharedPayload(NAMED, "flattened_bucket", copies=2)
    assert len(payload.texts) == 2 and _own_shm_files()
    payload.release(delivered=False)  # the engine was down: nobody will decode it
    del payload
    assert _own_shm_files() == []


@pytest.mark.parametrize("load_format", ["flattened_bucket", None])
def test_payload_refused_after_decoding_goes_back_to_the_sender(load_format):
    """A receiver that refuses a decoded payload hands its references back; the sender, told
    the payload was not delivered, drops them, and the files go (none too early: the
    receiver's views stay readable until then)."""
    payload = SharedPayload(NAMED, load_format, copies=2)
    decoded = [decode_payload(text, load_format) for text in payload.texts]
    for one in decoded:
        one.refuse()
    payload.release(delivered=False)
    assert [(n, t.tolist()) for n, t in decoded[1].named] == [(n, t.tolist()) for n, t in NAMED]
    del decoded, payload, one  # `one` still views the last payload's tensors
    assert _own_shm_files() == []


def test_a_payload_failing_its_structure_check_goes_back_to_the_sender():
    payload = SharedPayload(NAMED, None)  # a named-tensor list, decoded as a bucket: refused
    with pytest.raises(PayloadError, match="flattened_bucket"):
        decode_payload(payload.texts[0], "flattened_bucket")
    payload.release(delivered=False)
    del payload
    assert _own_shm_files() == []


def test_sender_tensors_are_not_moved_to_shared_memory():
    tensor = torch.randn(4)
    SharedPayload([("x", tensor)], None).release(delivered=False)
    assert not tensor.is_shared()


@pytest.mark.parametrize("obj, match", [
    (os.system, "not allowed"),
    (pickle.loads, "not allowed"),
    ([("x", 1)], "pair"),
    ({"a": 1}, "list of"),
])
def test_allow_list_and_structure_errors(obj, match):
    with pytest.raises(PayloadError, match=match):
        decode_named_tensors(_b64(obj), None)


def test_bad_bucket_metadata_is_an_error():
    bad = {"flattened_tensor": torch.zeros(8, dtype=torch.uint8),
           "metadata": [FlattenedTensorMetadata("w", torch.Size([4]), torch.float32, 0, 16, 16)]}
    with pytest.raises(PayloadError, match="byte range"):
        unflatten_bucket(bad)
    with pytest.raises(PayloadError, match="keys"):
        unflatten_bucket({"flattened_tensor": torch.zeros(1)})
    with pytest.raises(PayloadError, match="base64"):
        decode_named_tensors("%%%", None)


def test_split_into_buckets_respects_size_and_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5])]  # fp32
    buckets = split_into_buckets(named, bucket_bytes=80)
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_generate_request_parsing_and_expansion():
    req = protocol.parse_generate({"input_ids": [[1, 2], [3]], "rid": ["a", "b"],
                                   "sampling_params": {"n": 2, "sampling_seed": 7, "top_k": -1}})
    samples = protocol.expand_generate_request(req, req.input_ids, "x")
    assert [s.rid for s in samples] == ["a-0", "a-1", "b-0", "b-1"]
    assert [s.params.sampling_seed for s in samples] == [7, 8, 7, 8]
    assert samples[0].params.top_k == protocol.TOP_K_ALL


@pytest.mark.parametrize("body, match", [
    ({"input_ids": [1], "sampling_params": {"regex": "x"}}, "unsupported field"),
    ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1], "sampling_params": {"max_new_tokens": True}}, "bool"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "logprob_start_len": 0, "top_logprobs_num": 5}, "top_logprobs_num"),
    ({"sampling_params": {}}, "exactly one"),
    ({"input_ids": [1], "foo": 2}, "unsupported field"),
])
def test_bad_generate_requests_name_the_field(body, match):
    with pytest.raises(protocol.RequestError, match=match):
        req = protocol.parse_generate(body)
        protocol.expand_generate_request(req, [req.input_ids], "x")


def test_control_request_parsing():
    assert protocol.parse(protocol.PauseGenerationReqInput, {"mode": "retract"}).mode == "retract"
    with pytest.raises(protocol.RequestError, match="mode"):
        protocol.parse(protocol.PauseGenerationReqInput, {"mode": "later"})
    with pytest.raises(protocol.RequestError, match="unsupported"):
        protocol.parse(protocol.UpdateWeightsFromTensorReqInput, {"named_tensors": []})
    with pytest.raises(protocol.RequestError, match="load_format"):
        protocol.parse(protocol.UpdateWeightsFromTensorReqInput, {"load_format": "npz"})
    with pytest.raises(protocol.RequestError, match="memory tag"):
        protocol.parse(protocol.MemoryOccupationReqInput, {"tags": ["gpu"]})
    assert protocol.parse(protocol.MemoryOccupationReqInput, None).resolved_tags == protocol.MEMORY_TAGS


def test_unaligned_bucket_from_another_sender_decodes():
    # SGLang's own FlattenedTensorBucket packs tensors back to back, without alignment.
    parts = [torch.arange(3, dtype=torch.uint8), torch.tensor([7, 8], dtype=torch.int64)]
    flat = torch.cat([p.view(torch.uint8) for p in parts])
    meta = [FlattenedTensorMetadata("u", torch.Size([3]), torch.uint8, 0, 3, 3),
            FlattenedTensorMetadata("l", torch.Size([2]), torch.int64, 3, 19, 16)]
    decoded = dict(unflatten_bucket({"flattened_tensor": flat, "metadata": meta}))
    assert decoded["l"].tolist() == [7, 8] and decoded["u"].tolist() == [0, 1, 2]


def test_kept_mappings_keep_what_two_sessions_in_a_row_used_and_count_what_they_let_go():
    """Only the identity of the files matters here (their storages stand in as objects)."""
    kept = KeptMappings()

    def session(*handles: bytes) -> int:
        for handle in handles:
            kept.used(DecodedPayload(named=[], taken=[(handle, object())]))
        return kept.end_session()

    assert session(b"/reused", b"/once") == 0 and kept.kept == 0  # seen once: nothing kept
    assert session(b"/reused", b"/fresh") == 0 and kept.kept == 1  # seen twice: kept
    assert session(b"/reused") == 0 and kept.kept == 1
    assert session(b"/other") == 1 and kept.kept == 0  # a session without it lets it go
