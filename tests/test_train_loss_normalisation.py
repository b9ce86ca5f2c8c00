"""The loop's update is the exact token mean over the whole mini-batch, however it is split.

The same mini-batch (uneven response lengths, an entropy bonus, several packed micro-batches per
rank) trained at data parallel 2 must give the loss, gradient norm and updated weights of one
process; a replica left without samples (more ranks than samples) must change nothing either.
Ranks are the loop's own rank functions (controller/ranks.py) in forked gloo processes.
"""
import pytest
import torch

from or1_megatron.controller import ranks
from or1_megatron.controller.batch import TrainBatch, TrainSample
from or1_megatron.distributed.rank_group import RankGroup
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config

VOCAB = 300


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), vocab_size=VOCAB)


def setup(rank, world, hf_dir, tp):
    return ranks.setup_policy_rank(rank, world, policy_config(hf_dir, tp, 1, world))


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k, (prompt_len, response_len) in enumerate([(3, 9), (4, 2), (2, 6), (5, 5), (3, 1), (2, 11)]):
        ids = torch.randint(0, VOCAB, (prompt_len + response_len,), generator=g).tolist()
        advantage = float(torch.randn((), generator=g))
        samples.append(TrainSample(ids[:prompt_len], ids[prompt_len:], advantage, group=k // 2))
    return TrainBatch(samples)


def train_once(state, batch, indices):
    merged = {}
    part = ranks.old_logprobs(state, batch.sequences)
    gathered = [None] * state.worker.layout.world_size
    torch.distributed.all_gather_object(gathered, part)
    for p in gathered:
        merged.update(p or {})
    # Old log-probs slightly off the current ones: ratios differ from 1, so clipping is exercised.
    batch.old_logprobs = [merged[i][0] + 0.3 * ((i % 3) - 1) for i in range(len(batch.samples))]
    metrics = ranks.train_policy(state, batch, indices, 0.01, 0.2, 0.28, 0.0)
    return metrics, ranks.score_sequences(state, batch.sequences)


def run(hf_dir, world, indices, tp=1):
    with RankGroup(world, setup, hf_dir, tp, timeout_s=120) as group:
        results = group.call(train_once, make_batch(), indices)
    metrics = results[0][0]
    scores = next(r[1] for r in results if r[1] is not None)
    return metrics, scores


def close(a, b, tol):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_data_parallel_update_equals_single_process(hf_dir):
    everything = list(range(6))
    single, single_scores = run(hf_dir, 1, everything)
    dp2, dp2_scores = run(hf_dir, 2, everything)
    assert single["tokens"] == dp2["tokens"] == sum(len(s.response_ids) for s in make_batch().samples)
    for name in ("loss", "pg_loss_sum", "clipfrac_sum", "entropy_sum"):
        assert abs(single[name] - dp2[name]) <= 1e-5 * max(1.0, abs(single[name])), name
    assert single["clipfrac_sum"] > 0  # the clip is part of what is compared
    assert abs(single["grad_norm"] - dp2["grad_norm"]) <= 1e-5 * single["grad_norm"]
    for a, b in zip(single_scores, dp2_scores, strict=True):
        assert close(a, b, 2e-5)


def test_a_replica_without_samples_adds_nothing(hf_dir):
    # A mini-batch of one sample over two replicas: one trains it, the other runs the
    # zero-weight placeholder that keeps the gradient all-reduce in step.
    only = [1]
    single, single_scores = run(hf_dir, 1, only)
    dp2, dp2_scores = run(hf_dir, 2, only)
    assert dp2["tokens"] == single["tokens"] == 2
    assert abs(single["grad_norm"] - dp2["grad_norm"]) <= 1e-5 * single["grad_norm"]
    for a, b in zip(single_scores, dp2_scores, strict=True):
        assert close(a, b, 2e-5)


def lr_after_restart(state, batch):
    ranks.restart_lr_schedule(state, 3e-3, 0)
    first = train_once(state, batch, [0, 1])[0]["lr"]
    ranks.restart_lr_schedule(state, 1e-3, 2)  # warm-up from 0 over two steps
    return first, [train_once(state, batch, [0, 1])[0]["lr"] for _ in range(3)]


def test_restarted_lr_schedule_is_the_rate_the_optimizer_uses(hf_dir):
    # The supervised warm-up trains at warmup.sft_lr, then RL restarts at optim.lr.
    with RankGroup(1, setup, hf_dir, 1, timeout_s=120) as group:
        [(first, then)] = group.call(lr_after_restart, make_batch())
    assert first == pytest.approx(3e-3)
    assert then == pytest.approx([0.0, 5e-4, 1e-3])
