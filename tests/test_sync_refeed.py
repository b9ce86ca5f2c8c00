"""An engine that crashes during rollouts comes back with the trainer's CURRENT weights.

The router restarts a dead engine on its own; the training loop gives it a hook that re-feeds
the weights of the last sync through the coordinator (`WeightSyncCoordinator.refeed`), so the
restarted engine never serves the base model under the current weight version. Checked with a
trained TP=2 policy: after the crash the engine's log-probabilities equal the trainer's again.
"""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from or1_megatron.config.schema import SyncConfig
from or1_megatron.distributed.rank_group import RankGroup
from or1_megatron.rollout.router import RolloutRouter
from or1_megatron.sync.coordinator import WeightSyncCoordinator
from tests.rollout_testutil import make_tiny_qwen2, running_cpu_engines
from tests.test_sync_weight_sync import VOCAB, push_rank, score_rank, setup_rank, train_rank


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def test_engine_restarted_by_the_router_gets_the_current_weights(hf_dir, tmp_path):
    config = SyncConfig(transport="colocated", bucket_mb=0.03, verify=True, verify_tolerance=1e-4,
                        timeout_s=60)
    with running_cpu_engines(hf_dir, tmp_path / "logs", count=1) as engines, \
            RankGroup(2, setup_rank, hf_dir, 2, 1, timeout_s=120) as group:
        group.call(train_rank, 7)

        def push(plan):
            return group.call(push_rank, plan)

        def score(sequences):
            return next(r for r in group.call(score_rank, sequences) if r is not None)

        coordinator = WeightSyncCoordinator(engines, config, vocab_size=VOCAB)

        async def refeed(client):
            await coordinator.refeed(0, push)

        async def scenario():
            router = RolloutRouter(engines, health_interval_s=0.3, resync=refeed)
            await router.start()
            try:
                await coordinator.sync(push, score)  # version 1: the trained weights
                os.kill(engines[0].pid, signal.SIGKILL)  # crashes between two rollouts
                params = {"max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 3}
                # The router notices, restarts it, runs the hook, then serves this request.
                await router.generate([5, 6, 7], params)
                restarted = engines[0].restarts
                version = await coordinator.clients[0].weight_version()
                return restarted, version, await coordinator.verify(score)
            finally:
                await router.close(kill_engines=False)
                await coordinator.close()

        restarted, version, diffs = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert restarted == 1 and version == "1"
    assert max(diffs.values()) <= 1e-4, diffs  # the trainer's weights, not the base model's
