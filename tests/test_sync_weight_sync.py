"""Weight sync end to end: Megatron TP/PP trainer ranks -> two CPU engine processes.

For each trainer layout (TP2, PP2, TP2xPP2) and each transport, the trainer trains one step,
the coordinator syncs, and every engine's log-probabilities on the probe batch must equal the
trainer's (checked before the sync too, where they must differ). An engine killed during a sync
must come back with the new weights. Engines start once for the module; trainer ranks are
forked per case (about a second).
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

import pytest
import torch

from or1_megatron.config.schema import SyncConfig
from or1_megatron.distributed.rank_group import RankGroup
from or1_megatron.policy.worker import PolicyWorker
from or1_megatron.rollout.router import RolloutRouter
from or1_megatron.sync.coordinator import WeightSyncCoordinator
from or1_megatron.sync.plan import SyncVerificationError, WeightSyncError
from or1_megatron.sync.sender import WeightSender
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config, random_sequences
from tests.rollout_testutil import running_cpu_engines

VOCAB = 300
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2_pp2": (2, 2)}
TRANSPORTS = ("colocated", "distributed", "disk")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), vocab_size=VOCAB,
                           max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engines(hf_dir, tmp_path_factory):
    with running_cpu_engines(hf_dir, tmp_path_factory.mktemp("engine_logs"), count=2) as procs:
        yield procs


RANK_PIDS: list[int] = []  # every trainer rank this module forked


@pytest.fixture(scope="module", autouse=True)
def no_shared_memory_left(engines):
    yield
    for p in engines:
        p.kill()
    prefixes = tuple(f"torch_{pid}_" for pid in [os.getpid(), *RANK_PIDS])
    left = [f for f in os.listdir("/dev/shm") if f.startswith(prefixes)]
    assert RANK_PIDS and left == []


# -- rank side (forked trainer ranks) ----------------------------------------------------------

def setup_rank(rank, world, hf_dir, tp, pp):
    worker = PolicyWorker(policy_config(hf_dir, tp, pp, world))
    return {"worker": worker, "sender": WeightSender()}


def train_rank(state, seed):
    sequences = random_sequences(VOCAB, (7, 12, 5, 9), seed=seed)
    predicted = sum(len(s) - 1 for s in sequences)

    def loss_fn(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / predicted, {}

    return state["worker"].train_step(sequences, loss_fn)


def push_rank(state, plan):
    return state["sender"].push(state["worker"], plan)


def score_rank(state, sequences):
    results = state["worker"].compute_logprobs(sequences)
    return None if results is None else [r.logprob.tolist() for r in results]


# -- driver side -------------------------------------------------------------------------------

def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=240))


def sync_config(transport, tmp_path):
    # Small buckets: the tiny model spans several, and its embedding is larger than one.
    return SyncConfig(transport=transport, bucket_mb=0.03, verify=True, verify_tolerance=1e-4,
                      timeout_s=60, disk_dir=str(tmp_path / "weights"))


def hf_bytes(hf_dir) -> int:
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * 4 for k in f.keys())


def driver(group):
    RANK_PIDS.extend(group.pids)

    def push(plan):
        return group.call(push_rank, plan)

    def score(sequences):
        return next(r for r in group.call(score_rank, sequences) if r is not None)

    return push, score


# Every layout over every transport, TP shards mapped from the peers' shared memory (the CPU
# default); and once with the shards sent point to point (what GPUs and multi-node groups do).
CASES = [pytest.param(layout, transport, True, id=f"{layout}-{transport}")
         for layout in LAYOUTS for transport in TRANSPORTS]
CASES.append(pytest.param("tp2_pp2", "colocated", False, id="tp2_pp2-colocated-point_to_point"))


def recording(push):
    """`push`, and the list of the reports of every push it made (one list per push)."""
    pushed = []

    def push_and_keep(plan):
        reports = push(plan)
        pushed.append(reports)
        return reports

    return push_and_keep, pushed


def tp_shards(reports) -> set[str]:
    return {r.tp_shards for r in reports if r.sent}


@pytest.mark.parametrize("layout,transport,share_parameters", CASES)
def test_engines_equal_trainer_after_one_step(hf_dir, engines, tmp_path, layout, transport,
                                              share_parameters):
    tp, pp = LAYOUTS[layout]
    seed = 100 + 10 * list(LAYOUTS).index(layout) + TRANSPORTS.index(transport) + share_parameters
    with RankGroup(tp * pp, setup_rank, hf_dir, tp, pp, timeout_s=120) as group:
        push, score = driver(group)
        push_and_keep, pushed = recording(push)
        group.call(train_rank, seed)  # a different step in each case: engines start stale
        config = replace(sync_config(transport, tmp_path), share_parameters=share_parameters)
        coordinator = WeightSyncCoordinator(engines, config, vocab_size=VOCAB,
                                            hf_config_dir=str(hf_dir))

        async def scenario():
            try:
                with pytest.raises(SyncVerificationError, match=r"engine 0 \(http"):
                    await coordinator.verify(score)
                report = await coordinator.sync(push_and_keep, score)
                versions = [await c.weight_version() for c in coordinator.clients]
                return report, versions
            finally:
                await coordinator.close()

        report, versions = run(scenario())
    how = {"shared_memory" if share_parameters else "point_to_point"} if tp > 1 else {""}
    assert [tp_shards(reports) for reports in pushed] == [how]
    assert report.version == "1" and versions == ["1", "1"] and coordinator.version == 1
    assert report.bytes_per_engine == hf_bytes(hf_dir)  # every tensor once, no vocab padding
    assert report.buckets > pp  # bucketed, per stage
    assert set(report.verify_max_diff) == {p.url for p in engines}
    assert max(report.verify_max_diff.values()) <= 1e-4, report.verify_max_diff
    assert report.restarted == []


def fill_shared_memory_of_tp_peers(state):
    """/dev/shm is full for TP rank 1 from now on: moving its parameters there fails."""
    from or1_megatron.sync import shared_params

    def full(model):
        raise OSError(28, "No space left on device")

    if state["worker"].layout.tp_rank != 0:
        shared_params.share_parameters = full


def test_a_failed_shared_memory_hand_over_falls_back_to_point_to_point(hf_dir, engines, tmp_path):
    """Every rank learns of a peer's failure together (no rank left waiting in a collective)
    and that push, and the ones after it, send the shards point to point."""
    with RankGroup(2, setup_rank, hf_dir, 2, 1, timeout_s=120) as group:
        push, score = driver(group)
        coordinator = WeightSyncCoordinator(engines, sync_config("colocated", tmp_path),
                                            vocab_size=VOCAB, hf_config_dir=str(hf_dir))
        push_and_keep, pushed = recording(push)

        async def scenario():
            try:
                group.call(train_rank, 301)
                first = await coordinator.sync(push_and_keep, score)
                group.call(fill_shared_memory_of_tp_peers)
                group.call(train_rank, 302)
                second = await coordinator.sync(push_and_keep, score)
                third = await coordinator.sync(push_and_keep, score)
                return first, second, third
            finally:
                await coordinator.close()

        reports = run(scenario())
    assert [tp_shards(reports) for reports in pushed] == [
        {"shared_memory"}, {"point_to_point"}, {"point_to_point"}]
    for report in reports:
        assert max(report.verify_max_diff.values()) <= 1e-4, report.verify_max_diff


# Killed before the push: the sender finds the engine unreachable (colocated) or unhealthy
# (distributed); killed after it: the engine had the weights but died before the session ended
# (disk re-feeds it from this version's files).
@pytest.mark.parametrize("transport,when", [("colocated", "before_push"),
                                            ("distributed", "before_push"), ("disk", "after_push")])
def test_engine_killed_during_sync_comes_back_with_the_new_weights(hf_dir, engines, tmp_path,
                                                                   transport, when):
    victim = engines[1]
    restarts = victim.restarts
    with RankGroup(4, setup_rank, hf_dir, 2, 2, timeout_s=120) as group:
        push, score = driver(group)
        group.call(train_rank, 200 + TRANSPORTS.index(transport) + (when == "before_push"))
        # The router of the same engines (health checks every 0.2 s) must leave the victim to
        # the sync: one restart in all, then the router serves from it again.
        router = RolloutRouter(engines, health_interval_s=0.2)
        coordinator = WeightSyncCoordinator(engines, sync_config(transport, tmp_path),
                                            vocab_size=VOCAB, hf_config_dir=str(hf_dir),
                                            router=router)
        pushes = []

        def push_and_kill(plan):
            if when == "before_push" and not pushes:
                victim.kill()
            pushes.append([t.index for t in plan.targets])
            reports = push(plan)
            if when == "after_push" and len(pushes) == 1:
                victim.kill()  # it got the weights, then died before the session ended
            return reports

        async def scenario():
            await router.start()
            try:
                first = await coordinator.sync(push_and_kill, score)
                second = await coordinator.sync(push, score)  # the restarted engine keeps working
                await asyncio.wait_for(router.slots[1].recovery or asyncio.sleep(0), 60)
                return first, second, [slot.healthy for slot in router.slots]
            finally:
                await coordinator.close()
                await router.close(kill_engines=False)

        first, second, healthy = run(scenario())
    assert first.restarted == [victim.url] and victim.restarts == restarts + 1
    assert healthy == [True, True]
    # The trainer pushed again to the restarted engine alone; disk re-feeds it from this
    # version's files instead.
    assert pushes == ([[0, 1]] if transport == "disk" else [[0, 1], [1]])
    assert max(first.verify_max_diff.values()) <= 1e-4, first.verify_max_diff
    assert second.version == "2" and second.restarted == []
    assert torch.tensor(list(second.verify_max_diff.values())).max() <= 1e-4


def test_a_hanging_push_times_out_and_the_next_sync_works(hf_dir, engines, tmp_path):
    config = sync_config("colocated", tmp_path)
    config.timeout_s = 2
    with RankGroup(2, setup_rank, hf_dir, 2, 1, timeout_s=120) as group:
        push, score = driver(group)
        coordinator = WeightSyncCoordinator(engines, config, vocab_size=VOCAB)

        def hanging_push(plan):
            time.sleep(4)  # a trainer that never answers within sync.timeout_s
            return []

        async def scenario():
            try:
                with pytest.raises(WeightSyncError, match="did not finish within sync.timeout_s=2"):
                    await coordinator.sync(hanging_push, score)
                coordinator.config.timeout_s = 60
                return await coordinator.sync(push, score)
            finally:
                await coordinator.close()

        report = run(scenario())
    assert report.version == "1" and max(report.verify_max_diff.values()) <= 1e-4
