"""GPU-only: the transformer-engine layer spec builds the same model as the local spec.

Skipped without a CUDA GPU. On a GPU both specs load the same HF weights, expose the same
canonical parameter names, and score sequences like transformers.
"""
import pytest
import torch

from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.tiny_model import make_tiny_qwen2
from or1_megatron.policy.oracle import transformers_oracle
from tests.policy_support import policy_config, random_sequences

pytestmark = pytest.mark.gpu
SEQUENCES = random_sequences(300, (7, 12, 5, 9))


def rank_spec(rank, world, hf_dir, spec, tp):
    from or1_megatron.convert.qwen2 import canonical_mcore_name
    from or1_megatron.policy.worker import PolicyWorker

    worker = PolicyWorker(policy_config(hf_dir, tp, 1, world, **{"model.layer_spec": spec}))
    names = sorted(canonical_mcore_name(n) for n, _ in worker.unwrapped.named_parameters())
    scores = worker.compute_logprobs(SEQUENCES)
    return names, [s.logprob.cpu() for s in scores]


@pytest.mark.parametrize("tp", [1, 2])
def test_te_spec_matches_local_spec_and_transformers(tmp_path, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    hf_dir = make_tiny_qwen2(tmp_path / "hf")
    oracle = transformers_oracle(hf_dir, SEQUENCES)
    te_names, te_scores = run_forked(rank_spec, tp, hf_dir, "te", tp)[0]
    local_names, local_scores = run_forked(rank_spec, tp, hf_dir, "local", tp)[0]
    assert te_names == local_names
    for te, local, expected in zip(te_scores, local_scores, oracle):
        torch.testing.assert_close(te.double(), expected["logprob"], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(te, local, atol=2e-3, rtol=1e-3)
