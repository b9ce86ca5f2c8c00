"""The device-discipline check over what a trainer rank does in a step: old log-probs, an OR1
training step, a verified weight sync. On a GPU each tensor this package builds must be made on
a device it names, and each collective must get tensors on its group's device; on a CPU those
bugs pass silently, so the check (a TorchFunctionMode plus wrapped collectives) runs here."""
from __future__ import annotations

import asyncio

import pytest
import torch

from or1_megatron.config.schema import SyncConfig
from or1_megatron.controller import ranks
from or1_megatron.controller.batch import TrainBatch, TrainSample
from or1_megatron.distributed.device_discipline import DeviceDiscipline
from or1_megatron.distributed.rank_group import RankGroup
from or1_megatron.sync.coordinator import WeightSyncCoordinator
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config, random_sequences
from tests.rollout_testutil import running_cpu_engines

VOCAB = 300


def _setup(rank: int, world_size: int, hf_dir: str) -> dict:
    config = policy_config(hf_dir, tp=2, world=2)
    return {"rank": ranks.setup_policy_rank(rank, world_size, config), "violations": []}


def _checked(state: dict, fn, *args):
    """`fn(policy_rank, *args)` with the device check on; violations are kept on the rank."""
    with DeviceDiscipline() as violations:
        result = fn(state["rank"], *args)
    state["violations"].extend(str(v) for v in violations)
    return result


def _violations(state: dict) -> list[str]:
    return state["violations"]


def _a_batch() -> TrainBatch:
    sequences = random_sequences(VOCAB, (9, 12, 7, 10), seed=3)
    samples = [TrainSample(s[:4], s[4:], advantage, group)
               for s, advantage, group in zip(sequences, (1.0, -1.0, 0.5, -0.5), (0, 0, 1, 1))]
    return TrainBatch(samples)


def test_a_train_step_and_a_verified_sync_keep_device_discipline(tmp_path):
    hf_dir = make_tiny_qwen2(tmp_path / "model", vocab_size=VOCAB, max_position_embeddings=1024)
    batch = _a_batch()
    with running_cpu_engines(hf_dir, tmp_path / "logs") as engines, \
            RankGroup(2, _setup, str(hf_dir), timeout_s=120) as group:
        parts = group.call(_checked, ranks.old_logprobs, batch.sequences)
        merged = {}
        for part in parts:
            merged.update(part or {})
        batch.old_logprobs = [merged[i][0] for i in range(len(batch.samples))]
        group.call(_checked, ranks.train_policy, batch, list(range(4)), 0.01, 0.2, 0.28, 3.0)
        coordinator = WeightSyncCoordinator(
            engines, SyncConfig(transport="colocated", timeout_s=60), vocab_size=VOCAB,
            hf_config_dir=str(hf_dir), run_dir=str(tmp_path))

        def push(plan):
            return group.call(_checked, ranks.push_weights, plan)

        def score(sequences):
            return next(r for r in group.call(_checked, ranks.score_sequences, sequences) if r)

        async def sync():
            try:
                report = await coordinator.sync(push)
                return report, await coordinator.verify(score)
            finally:
                await coordinator.close()

        report, diffs = asyncio.run(asyncio.wait_for(sync(), 120))
        violations = group.call(_violations)
    assert report.version == "1" and max(diffs.values()) < 1e-3
    found = sorted({v for per_rank in violations for v in per_rank})
    assert found == [], "\n".join(found)


def _misbehave(rank: int, world_size: int) -> list[str]:
    with DeviceDiscipline(roots=[__file__]) as violations:
        fine = torch.zeros(2, device="cpu") + torch.as_tensor(torch.ones(2, device="cpu"))
        bad = torch.zeros(2)  # the bug: no device
        torch.distributed.all_reduce(fine)
        torch.distributed.all_reduce(torch.zeros(2, device="meta"))  # the bug: wrong device
        del bad
    return [str(v) for v in violations]


def test_the_check_sees_a_missing_device_and_a_collective_on_the_wrong_device():
    from or1_megatron.distributed.fork_launcher import run_forked

    found = run_forked(_misbehave, 1, timeout_s=60)[0]
    assert len(found) == 2, found
    assert found[0].endswith("torch.zeros without device=")
    assert "dist.all_reduce given a tensor on meta; its group's backend (gloo) needs cpu" in found[1]
