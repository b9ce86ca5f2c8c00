"""The router over two CPU engines: spreading, weight pushes, and SIGKILL of an engine mid-batch."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from or1_megatron.rollout.router import RolloutRouter
from tests.rollout_testutil import (forward_logprobs, load_model, make_tiny_qwen2, perturbed_weights,
                                    run, running_cpu_engines, wait_for_state)

PROMPTS = [[3 + i, 40 + i, 7 * i % 290 + 1] for i in range(16)]


def params(i: int, n: int = 24) -> dict:
    return {"max_new_tokens": n, "temperature": 1.0, "sampling_seed": 1000 + i, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def processes(model_dir, tmp_path_factory):
    """Two engines for the whole module; each test's router adopts them and leaves them running."""
    with running_cpu_engines(model_dir, tmp_path_factory.mktemp("logs"), count=2,
                             max_running_requests=8) as procs:
        yield procs


async def _router(processes) -> RolloutRouter:
    router = RolloutRouter(processes, health_interval_s=0.5)
    await router.start()
    return router


def test_requests_spread_and_weights_reach_every_engine(model_dir, processes):
    model = load_model(model_dir)
    new = perturbed_weights(model, seed=11)

    async def scenario():
        router = await _router(processes)
        try:
            await router.update_weights(list(new.items()), weight_version="v1")
            results = await router.generate_many(PROMPTS, [params(i) for i in range(len(PROMPTS))])
            versions = await router.weight_versions()
            served = [slot.served for slot in router.slots]
        finally:
            await router.close(kill_engines=False)
        return results, versions, served

    results, versions, served = run(scenario())
    assert versions == ["v1", "v1"]
    assert all(count > 0 for count in served) and sum(served) == len(PROMPTS)
    model.load_state_dict(new)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.weight_version == "v1"
        torch.testing.assert_close(torch.tensor(result.output_logprobs),
                                   forward_logprobs(model, prompt, result.output_ids),
                                   atol=1e-4, rtol=0)


def test_sigkill_during_a_batch_restarts_engine_and_answers_every_request_once(model_dir, processes):
    model = load_model(model_dir)
    new = perturbed_weights(model, seed=12)
    requests = [(f"r{i}", PROMPTS[i], params(i, n=100)) for i in range(len(PROMPTS))]

    async def scenario():
        router = await _router(processes)
        try:
            await router.update_weights(list(new.items()), weight_version="v7")
            reference = await asyncio.gather(*(router.generate(p, sp, rid=rid)
                                               for rid, p, sp in requests))
            victim = router.slots[0]
            old_pid = victim.process.pid
            # Paused in place, the victim accepts its share of the batch and holds it unanswered,
            # so the kill lands with requests in flight however fast the machine is.
            await victim.client.pause_generation("in_place")
            tasks = [asyncio.create_task(router.generate(p, sp, rid=rid)) for rid, p, sp in requests]

            async def victim_holds_its_share():
                load = await victim.client.load()
                held = load["num_running_reqs"] + load["num_waiting_reqs"]
                return victim.inflight > 0 and held == victim.inflight
            await wait_for_state(victim_holds_its_share, "the victim to hold its requests")
            assert not any(task.done() for task in tasks)
            os.kill(old_pid, signal.SIGKILL)
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 150)
            # Wait for the restart to finish, then check the engine got the current weights back.
            await asyncio.wait_for(victim.recovery, 120)
            assert victim.healthy and victim.process.pid != old_pid
            [check] = await victim.client.generate([PROMPTS[0]], params(0, n=8))
            return reference, answers, check, victim, router.resent
        finally:
            await router.close(kill_engines=False)

    reference, answers, check, victim, resent = run(scenario())
    assert victim.process.restarts == 1 and victim.history, victim.history
    assert resent >= 1  # some requests were cut off by the kill and sent again
    # Exactly one answer per request, and it is the answer the request would have had anyway.
    assert [a.rid for a in answers] == [rid for rid, _, _ in requests]
    assert [a.output_ids for a in answers] == [r.output_ids for r in reference]
    assert all(a.finish_reason == "length" and len(a.output_ids) == 100 for a in answers)
    model.load_state_dict(new)
    assert check.weight_version == "v7"
    torch.testing.assert_close(torch.tensor(check.output_logprobs),
                               forward_logprobs(model, PROMPTS[0], check.output_ids),
                               atol=1e-4, rtol=0)


def test_router_clients_send_one_payload_per_engine_tp_rank():
    class TwoGpuEngine:  # what the router reads of an SGLangEngineProcess with tp_size=2
        url = "http://127.0.0.1:9"
        tp_size = 2

    router = RolloutRouter([TwoGpuEngine()])
    assert router.slots[0].client.tp_size == 2


def test_a_weight_sync_hold_stops_restarts_and_readmits_the_engine_it_repaired(processes):
    """While a sync holds the router, a dead engine is only taken out of service; the sync
    restarts it, and the router takes it back as it is. One still dead at the end is recovered."""
    async def scenario():
        router = await _router(processes)  # health checks every 0.5 s
        victim = router.slots[1]
        restarts = victim.process.restarts
        async def health_rounds_pass(count: int) -> None:
            target = router.health_rounds + count
            await wait_for_state(lambda: router.health_rounds >= target,
                                 f"{count} health-check rounds")

        try:
            async with router.recovery_paused():
                victim.process.kill()
                answers = await router.generate_many(PROMPTS[:4], [params(i, 8) for i in range(4)])
                await health_rounds_pass(4)  # no verdict, no restart while held
                assert not victim.process.alive() and victim.process.restarts == restarts
                assert not victim.healthy and victim.recovery is None
                # the sync restarts it (and feeds it its weights)
                await asyncio.to_thread(victim.process.restart)
                await asyncio.to_thread(victim.process.wait_ready)
                await health_rounds_pass(2)
                assert not victim.healthy  # not before the sync is over
            await asyncio.wait_for(victim.recovery, 60)
            readmitted = (victim.healthy, victim.process.restarts - restarts)
            [served] = await victim.client.generate([PROMPTS[0]], params(0, 4))

            async with router.recovery_paused():  # dead when the hold ends: recovered as usual
                victim.process.kill()  # reaps the process: dead on return
                assert not victim.process.alive()
            await asyncio.wait_for(victim.recovery, 120)
            recovered = (victim.healthy, victim.process.alive(), victim.process.restarts - restarts)
            return answers, router.resent, readmitted, served, recovered
        finally:
            await router.close(kill_engines=False)

    answers, resent, readmitted, served, recovered = run(scenario())
    assert [len(a.output_ids) for a in answers] == [8] * 4 and resent >= 1
    assert readmitted == (True, 1) and len(served.output_ids) == 4
    assert recovered == (True, True, 2)


class _NodeGone:
    """An engine process whose node went away: it can be killed, never restarted."""

    def __init__(self, process):
        self._process = process

    def __getattr__(self, name):
        return getattr(self._process, name)

    def restart(self):
        raise ConnectionError(f"the node of {self._process.url} is unreachable")


def test_when_no_engine_can_be_restarted_requests_fail_at_once_naming_it(model_dir, tmp_path):
    """A lost node takes its engine with it for good: requests used to wait wait_for_engine_s
    (600 s) for an engine that could not come back; they fail once its restarts have failed,
    naming the engine and its address (tests/test_two_nodes.py: the driver then exits)."""
    import re
    import time

    from or1_megatron.rollout.router import RouterError

    with running_cpu_engines(model_dir, tmp_path, count=1) as [process]:
        async def scenario():
            router = RolloutRouter([_NodeGone(process)], health_interval_s=0.5, wait_for_engine_s=600)
            await router.start()
            try:
                process.kill()
                start = time.monotonic()
                with pytest.raises(RouterError, match=r"every engine is down and could not be "
                                   rf"restarted: engine 0 \({re.escape(process.url)}\): restart failed"):
                    await router.generate(PROMPTS[0], params(0, 4))
                return time.monotonic() - start
            finally:
                await router.close(kill_engines=False)

        assert run(scenario()) < 60
