"""GPU-only: the policy on GPUs, in ranks spawned over NCCL as `or1 check` and the trainer run
them. Skipped without a CUDA GPU.

- the local spec (what runs without transformer-engine) scores like transformers in fp32 and
  bf16, and trains a step (metrics reduced over NCCL on the device);
- the transformer-engine spec (bf16: TE has no fp32 attention for packed sequences) builds the
  same parameters and scores like the local spec, where TE is installed.
"""
import math

import pytest
import torch

from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.policy.oracle import transformers_oracle
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config, random_sequences

pytestmark = pytest.mark.gpu
SEQUENCES = random_sequences(300, (7, 12, 5, 9))
TOLERANCE = {"fp32": 2e-3, "bf16": 8e-2}


def rank_spec(rank, world, hf_dir, spec, tp, dtype):
    from or1_megatron.convert.qwen2 import canonical_mcore_name
    from or1_megatron.policy.worker import PolicyWorker

    worker = PolicyWorker(policy_config(hf_dir, tp, 1, world, **{"model.layer_spec": spec,
                                                                 "model.dtype": dtype}))
    assert worker.device.type == "cuda"
    names = sorted(canonical_mcore_name(n) for n, _ in worker.unwrapped.named_parameters())
    scores = worker.compute_logprobs(SEQUENCES)

    def nll(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / 29, {"tokens": mb.target_mask.sum()}

    metrics = worker.train_step(SEQUENCES, nll)
    return names, scores and [s.logprob for s in scores], metrics


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tp", [1, 2])
def test_local_spec_on_gpus_scores_like_transformers_and_trains(tmp_path, tp, dtype):
    _needs(tp)
    hf_dir = make_tiny_qwen2(tmp_path / "hf")
    oracle = transformers_oracle(hf_dir, SEQUENCES)
    names, scores, metrics = run_forked(rank_spec, tp, hf_dir, "local", tp, dtype,
                                        backend="nccl", timeout_s=600)[0]
    assert len(scores) == len(oracle) == len(SEQUENCES)
    for ours, expected in zip(scores, oracle, strict=True):
        torch.testing.assert_close(ours.double(), expected["logprob"], atol=TOLERANCE[dtype],
                                   rtol=0)
    assert metrics["tokens"] == sum(len(s) - 1 for s in SEQUENCES)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


@pytest.mark.parametrize("tp", [1, 2])
def test_te_spec_matches_local_spec_in_bf16(tmp_path, tp):
    pytest.importorskip("transformer_engine.pytorch")
    _needs(tp)
    hf_dir = make_tiny_qwen2(tmp_path / "hf")
    te_names, te_scores, _ = run_forked(rank_spec, tp, hf_dir, "te", tp, "bf16",
                                        backend="nccl", timeout_s=600)[0]
    local_names, local_scores, _ = run_forked(rank_spec, tp, hf_dir, "local", tp, "bf16",
                                              backend="nccl", timeout_s=600)[0]
    assert te_names == local_names
    for te, local in zip(te_scores, local_scores, strict=True):
        torch.testing.assert_close(te, local, atol=TOLERANCE["bf16"], rtol=0)


def rank_recompute_step(rank, world, hf_dir, recompute):
    from or1_megatron.policy.worker import PolicyWorker

    worker = PolicyWorker(policy_config(hf_dir, **{"model.layer_spec": "local", "model.dtype": "fp32",
                                                   "model.recompute": recompute}))

    def nll(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / 29, {"tokens": mb.target_mask.sum()}

    first = worker.train_step(SEQUENCES, nll)  # torch.compile'd norms/SwiGLU/RoPE, fused AdamW
    second = worker.train_step(SEQUENCES, nll)
    return first, second


def test_recompute_modes_train_alike_on_a_gpu(tmp_path):
    _needs(1)
    hf_dir = make_tiny_qwen2(tmp_path / "hf")
    runs = {mode: run_forked(rank_recompute_step, 1, hf_dir, mode, backend="nccl", timeout_s=600)[0]
            for mode in ("none", "selective", "full")}
    for mode in ("selective", "full"):
        for got, want in zip(runs[mode], runs["none"], strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), mode
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), mode
