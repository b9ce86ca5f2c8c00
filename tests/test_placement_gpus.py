"""The run's Ray placement on logical GPUs (`ray.init(num_gpus=4)` on a CPU machine): the real
placement group, engine host actors and policy rank actors, none started. Every rank and engine
must fit, each rank sees one GPU, and each engine's GPUs are indices into its own
CUDA_VISIBLE_DEVICES: the policy ranks' GPUs when colocated, GPUs of its own otherwise."""
from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from or1_megatron.controller import run  # noqa: E402
from or1_megatron.controller.engines import start_engines  # noqa: E402
from or1_megatron.controller.placement import plan_placement  # noqa: E402
from or1_megatron.controller.ray_group import RayRankGroup  # noqa: E402
from or1_megatron.errors import OR1Error  # noqa: E402
from or1_megatron.tiny_model import make_tiny_qwen2  # noqa: E402
from tests.policy_support import policy_config  # noqa: E402

GPUS = 4


@pytest.fixture(scope="module")
def logical_gpus():
    ray.init(num_cpus=8, num_gpus=GPUS, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model", num_heads=4, num_kv_heads=4)


def _config(hf_dir, world: int, engines: int, engine_tp: int, placement: str, backend: str):
    overrides = {"rollout.backend": backend, "rollout.engines": engines,
                 "rollout.engine_tp": engine_tp, "rollout.placement": placement,
                 "rollout.start_timeout_s": 60,
                 "sync.transport": "colocated" if placement == "colocated" else "distributed"}
    return policy_config(hf_dir, tp=world, world=world, **overrides)


def _visible_devices(rank: int, world_size: int) -> list[str]:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")


def _state(state):
    return state


def _place(config, hf_dir, tmp_path):
    placement = plan_placement(config, config.rollout.backend, gpus=True)
    group = run._placement_group(config, placement)
    try:
        engines = start_engines(config, str(hf_dir), group, placement, str(tmp_path), start=False)
        views = [ray.get(e.host_actor.gpu_view.remote(), timeout=60) for e in engines]
        with RayRankGroup(config.parallel.world_size, _visible_devices, placement_group=group,
                          gpus_per_rank=placement.rank_gpus, timeout_s=60) as ranks:
            rank_gpus = ranks.call(_state)
        for engine in engines:
            ray.kill(engine.host_actor)
    finally:
        ray.util.remove_placement_group(group)
    return views, rank_gpus


def test_colocated_engines_share_the_policy_ranks_gpus(logical_gpus, hf_dir, tmp_path):
    # SGLang with TP 2 per engine (its command line is built, nothing is started)
    config = _config(hf_dir, world=4, engines=2, engine_tp=2, placement="colocated",
                     backend="sglang")
    views, rank_gpus = _place(config, hf_dir, tmp_path)
    assert all(len(g) == 1 for g in rank_gpus), rank_gpus
    assert sorted(g[0] for g in rank_gpus) == [str(i) for i in range(GPUS)]
    for engine, view in enumerate(views):
        visible = view["CUDA_VISIBLE_DEVICES"].split(",")
        # engine e's TP ranks sit on the GPUs of policy ranks 2e and 2e + 1, in TP order
        assert visible == [rank_gpus[2 * engine + k][0] for k in range(2)], (engine, view)
        assert view["uses"] == [0, 1] and max(view["uses"]) < len(visible)


def test_disaggregated_engines_get_gpus_of_their_own(logical_gpus, hf_dir, tmp_path):
    config = _config(hf_dir, world=2, engines=2, engine_tp=1, placement="disaggregated",
                     backend="torch")
    views, rank_gpus = _place(config, hf_dir, tmp_path)
    engine_gpus = [v["CUDA_VISIBLE_DEVICES"].split(",") for v in views]
    assert all(len(v) == 1 and view["uses"] == [0] for v, view in zip(engine_gpus, views, strict=True))
    everyone = [g[0] for g in rank_gpus] + [v[0] for v in engine_gpus]
    assert sorted(everyone) == [str(i) for i in range(GPUS)]  # nobody shares a GPU


def test_runs_that_cannot_work_on_gpus_are_refused_by_name(hf_dir, monkeypatch):
    monkeypatch.setattr(run, "_has_gpu", lambda: False)
    torch_engine = _config(hf_dir, world=1, engines=1, engine_tp=1, placement="colocated",
                           backend="torch")
    with pytest.raises(OR1Error, match="rollout.backend=torch runs engines on GPUs"):
        run.run_placement(torch_engine)
    monkeypatch.setattr(run, "_has_gpu", lambda: True)
    config = _config(hf_dir, world=4, engines=4, engine_tp=1, placement="colocated",
                     backend="torch")
    with pytest.raises(OR1Error, match="colocated GPU engines with 4 policy ranks"):
        run.run_placement(config)
    one_gpu = _config(hf_dir, world=1, engines=1, engine_tp=1, placement="colocated",
                      backend="torch")
    assert run.run_placement(one_gpu).rank_gpus == 0.8


def _rank_index(rank: int, world_size: int) -> int:
    return rank


def _one_rank_dies_while_the_other_blocks(state: int) -> None:
    import time

    if state == 1:
        os._exit(1)  # the rank's process dies, as when its node goes away
    time.sleep(120)  # rank 0 stands for a rank stuck in a collective with the dead one


def test_a_dead_rank_fails_the_call_at_once_naming_rank_and_node(logical_gpus):
    """While rank 0 is stuck (as in a collective with the dead rank), the call fails as rank 1
    dies, and says which rank on which node (it said only "a policy rank died")."""
    import time

    from ray.util.placement_group import placement_group

    from or1_megatron.distributed.fork_launcher import RankFailed

    group = placement_group([{"CPU": 1.0}] * 2)
    ray.get(group.ready(), timeout=60)
    try:
        ranks = RayRankGroup(2, _rank_index, placement_group=group, timeout_s=300)
        start = time.monotonic()
        with pytest.raises(RankFailed, match=r"policy rank 1 on node [\d.]+ died during "
                                             r"_one_rank_dies_while_the_other_blocks"):
            ranks.call(_one_rank_dies_while_the_other_blocks)
        assert time.monotonic() - start < 60
    finally:
        ray.util.remove_placement_group(group)
