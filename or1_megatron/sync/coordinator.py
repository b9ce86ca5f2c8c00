"""Runs one weight sync end to end, engine side: the sequence, the version, timeouts, restarts.

`sync(push, score)`: pause generation, open an update session (begin_weight_update) on every
engine, have the trainer push (the `push` callable runs the senders on the trainer ranks and
returns their reports; a Ray call later, forked ranks in tests), commit (disk), end the
session, flush the cache, continue generation, and check that every engine reports the new
weight version. An engine that fails anywhere in the sequence is restarted and re-fed the full
weights (a second push addressed to it alone) before generation continues; with `sync.verify`
the trainer and every engine then score a fixed probe batch. Every engine call and the push
are bounded by `sync.timeout_s`. Given the rollout router of the same engines, it holds the
router's own recovery for the length of the sync. This module never touches trainer tensors
itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from or1_megatron.config.schema import SyncConfig
from or1_megatron.rollout.engine import EngineError, EngineUnavailable, HttpEngine
from or1_megatron.rollout.launcher import EngineProcess
from or1_megatron.rollout.router import RolloutRouter
from or1_megatron.rollout.shm import remove_stale_shm_files
from or1_megatron.sync import verify as probe
from or1_megatron.sync.plan import EngineTarget, PushPlan, PushReport, WeightSyncError
from or1_megatron.sync.transports import transport_class

log = logging.getLogger(__name__)

# push(plan) runs the sender on every trainer rank and returns their reports.
PushFn = Callable[[PushPlan], Sequence[PushReport]]


@dataclass
class SyncReport:
    version: str
    seconds: float
    push_seconds: float
    bytes_per_engine: int
    buckets: int
    engines: int
    restarted: list[str] = field(default_factory=list)
    verify_max_diff: dict[str, float] = field(default_factory=dict)


class WeightSyncCoordinator:
    """Owns the weight version and the sync sequence over a fixed set of engine processes."""

    def __init__(self, engines: Sequence[EngineProcess], config: SyncConfig, *, vocab_size: int,
                 hf_config_dir: str | None = None, run_dir: str = "", engine_tp_size: int = 1,
                 max_repairs: int = 2, router: RolloutRouter | None = None, dtype: str = "fp32"):
        if not engines:
            raise ValueError("a weight sync needs at least one engine")
        self.engines = list(engines)
        self.config = config
        self.vocab_size = vocab_size
        self.hf_config_dir = hf_config_dir
        self.engine_tp_size = engine_tp_size
        self.max_repairs = max_repairs
        # The router serving rollouts from the same engines: it must not restart or re-feed one
        # while a sync owns them (this sync restarts failed engines itself).
        self.router = router
        self.transport = transport_class(config.transport)
        self.tolerance = probe.tolerance(dtype, config.verify_tolerance,
                                         config.verify_mean_tolerance)
        self.disk_root = Path(config.disk_dir or Path(run_dir or ".") / "weight_sync")
        self.clients = [self._client(p) for p in self.engines]
        self.version = 0
        # A crashed earlier run's payload files would hold host memory until a reboot.
        remove_stale_shm_files()
        self._lock = asyncio.Lock()

    def _client(self, process: EngineProcess) -> HttpEngine:
        return HttpEngine(process.url, tp_size=self.engine_tp_size, timeout_s=self.config.timeout_s)

    def _label(self, index: int) -> str:
        return f"engine {index} ({self.engines[index].url})"

    # ------------------------------------------------------------ the sequence

    async def sync(self, push: PushFn, score: probe.ScoreFn | None = None) -> SyncReport:
        """Push the trainer's current weights to every engine as version `self.version + 1`."""
        hold = self.router.recovery_paused() if self.router else contextlib.nullcontext()
        # The hold first: it waits for the router's running recoveries, whose re-feed of a
        # restarted engine (`refeed`) needs the lock.
        async with hold, self._lock:
            start = time.perf_counter()
            version = str(self.version + 1)
            everyone = set(range(len(self.engines)))
            failed = {i for i in everyone if not self.engines[i].alive()}
            live = await self._each(everyone - failed,
                                    lambda c: c.pause_generation(self.config.pause_mode),
                                    "pause_generation", failed)
            live = await self._each(live, lambda c: c.begin_weight_update(),
                                    "begin_weight_update", failed)
            plan = self._plan(version, live)
            try:
                self.transport.prepare(plan, self.hf_config_dir)
                push_start = time.perf_counter()
                reports = await self._push(push, plan, failed)
                push_seconds = time.perf_counter() - push_start
                live = await self._each(live - failed, lambda c: self.transport.commit(c, plan),
                                        "commit", failed)
            except BaseException:
                # Close the sessions so that the next sync can begin; generation stays paused,
                # since the engines may now hold part of the new weights.
                await self._each(live, lambda c: c.end_weight_update(), "end_weight_update", set(),
                                 quiet=True)
                raise
            await self._each(live, lambda c: c.end_weight_update(), "end_weight_update", failed)
            restarted = await self._repair(failed, plan, push)
            await self._each(everyone, lambda c: c.flush_cache(), "flush_cache", set(), strict=True)
            await self._each(everyone, lambda c: c.continue_generation(), "continue_generation",
                             set(), strict=True)
            await self._check_versions(version)
            self.version += 1
            self._drop_old_versions(plan)
            report = SyncReport(
                version=version, seconds=time.perf_counter() - start, push_seconds=push_seconds,
                bytes_per_engine=sum(r.bytes for r in reports),
                buckets=sum(r.buckets for r in reports), engines=len(self.engines),
                restarted=[self.engines[i].url for i in sorted(restarted)])
        if self.config.verify and score is not None:
            report.verify_max_diff = await self.verify(score)
        return report

    def _plan(self, version: str, indices: set[int]) -> PushPlan:
        targets = tuple(EngineTarget(i, self.engines[i].url, self.engine_tp_size)
                        for i in sorted(indices))
        return PushPlan(transport=self.config.transport, version=version, targets=targets,
                        bucket_bytes=int(self.config.bucket_mb * (1 << 20)), timeout_s=self.config.timeout_s,
                        disk_dir=str(self.disk_root / f"v{version}"),
                        master_address=self.config.master_address,
                        share_parameters=self.config.share_parameters)

    async def _push(self, push: PushFn, plan: PushPlan, failed: set[int]) -> list[PushReport]:
        if not plan.targets and plan.transport != "disk":
            return []
        try:
            reports = list(await asyncio.wait_for(asyncio.to_thread(push, plan),
                                                  self.config.timeout_s))
        except asyncio.TimeoutError:
            raise WeightSyncError(f"the trainer's push of version {plan.version} did not finish "
                                  f"within sync.timeout_s={self.config.timeout_s:g} s") from None
        by_url = {t.url: t.index for t in plan.targets}
        for report in reports:
            for url, reason in report.failed.items():
                log.warning("%s failed during the push of version %s: %s",
                            self._label(by_url[url]), plan.version, reason)
                failed.add(by_url[url])
        return reports

    async def _repair(self, failed: set[int], plan: PushPlan, push: PushFn) -> set[int]:
        """Restart every engine that failed and feed it the full weights; return their indices."""
        repaired: set[int] = set()
        for attempt in range(1, self.max_repairs + 1):
            if not failed:
                return repaired
            todo, failed_again = set(failed), set()
            failed.clear()
            for i in sorted(todo):
                log.warning("%s failed during sync %s: restarting it (attempt %d)",
                            self._label(i), plan.version, attempt)
                await self._restart(i)
            live = await self._each(todo, lambda c: c.pause_generation(self.config.pause_mode),
                                    "pause_generation", failed_again)
            live = await self._each(live, lambda c: c.begin_weight_update(),
                                    "begin_weight_update", failed_again)
            only = plan.only(live)
            if plan.transport != "disk":  # disk: this version's files are already written
                await self._push(push, only, failed_again)
            live = await self._each(live - failed_again, lambda c: self.transport.commit(c, only),
                                    "commit", failed_again)
            await self._each(live, lambda c: c.end_weight_update(), "end_weight_update",
                             failed_again)
            repaired |= todo
            failed |= failed_again
        if failed:
            names = ", ".join(self._label(i) for i in sorted(failed))
            raise WeightSyncError(f"sync {plan.version}: {names} still failing after "
                                  f"{self.max_repairs} restarts")
        return repaired

    async def _restart(self, index: int) -> None:
        process = self.engines[index]
        await self.clients[index].close()
        try:
            await asyncio.to_thread(process.restart)
            await asyncio.to_thread(process.wait_ready, self.config.timeout_s)
        except Exception as exc:
            raise WeightSyncError(f"{self._label(index)} could not be restarted: {exc}") from exc
        self.clients[index] = self._client(process)

    async def _each(self, indices: set[int], call: Callable[[HttpEngine], Awaitable[object]],
                    what: str, failed: set[int], strict: bool = False,
                    quiet: bool = False) -> set[int]:
        """Run `call` on the engines `indices` at once; returns those that answered.

        Unreachable engines are added to `failed` (or raise if `strict`); a refusal raises
        (unless `quiet`: best-effort clean-up after another error)."""
        order = sorted(indices)
        results = await asyncio.gather(
            *(asyncio.wait_for(call(self.clients[i]), self.config.timeout_s) for i in order),
            return_exceptions=True)
        ok = set()
        for i, result in zip(order, results):
            if quiet:
                if isinstance(result, BaseException):
                    log.warning("%s: %s failed: %r", self._label(i), what, result)
                continue
            if isinstance(result, (EngineUnavailable, asyncio.TimeoutError)):
                if strict:
                    raise WeightSyncError(f"{self._label(i)}: {what} failed: {result!r}")
                log.warning("%s: %s failed: %r", self._label(i), what, result)
                failed.add(i)
            elif isinstance(result, EngineError):
                raise WeightSyncError(f"{self._label(i)} refused {what}: {result.message}")
            elif isinstance(result, BaseException):
                raise result
            else:
                ok.add(i)
        return ok

    async def _check_versions(self, version: str) -> None:
        versions = await asyncio.gather(*(asyncio.wait_for(c.weight_version(), self.config.timeout_s)
                                          for c in self.clients))
        wrong = [f"{self._label(i)} reports {v!r}" for i, v in enumerate(versions) if v != version]
        if wrong:
            raise WeightSyncError(f"after sync {version}: " + "; ".join(wrong))

    def _drop_old_versions(self, plan: PushPlan) -> None:
        if plan.transport != "disk":
            return
        for old in self.disk_root.glob("v*"):
            if old.name != f"v{plan.version}":
                shutil.rmtree(old, ignore_errors=True)

    async def refeed(self, index: int, push: PushFn) -> None:
        """Give engine `index` the current weights after a restart outside a sync (the router
        restarted it when it crashed during rollouts): the push of the last sync, addressed to
        it alone, so it never serves the base weights under the current version."""
        if self.version == 0:
            return  # no sync yet: a fresh engine already holds the weights it started with
        async with self._lock:
            await self.clients[index].close()
            self.clients[index] = self._client(self.engines[index])
            version, failed = str(self.version), set()
            live = await self._each({index}, lambda c: c.begin_weight_update(),
                                    "begin_weight_update", failed)
            plan = self._plan(version, live)
            if plan.transport != "disk":  # disk: this version's files are still there
                await self._push(push, plan, failed)
            live = await self._each(live - failed, lambda c: self.transport.commit(c, plan),
                                    "commit", failed)
            await self._each(live, lambda c: c.end_weight_update(), "end_weight_update", failed)
            if failed:
                raise WeightSyncError(f"{self._label(index)}: re-feeding weight version {version} "
                                      "after its restart failed")

    # ------------------------------------------------------------ verification

    async def verify(self, score: probe.ScoreFn) -> dict[str, float]:
        """Every engine's greedy continuation of the probe prompts, scored by the trainer."""
        prompts = probe.probe_prompts(self.vocab_size, self.config.verify_prompts)
        params = probe.probe_sampling_params(self.config.verify_new_tokens)
        per_engine = await asyncio.gather(*(asyncio.wait_for(c.generate(prompts, params),
                                                             self.config.timeout_s)
                                            for c in self.clients))
        sequences = sorted({tuple(s) for results in per_engine
                            for s in probe.probe_sequences(prompts, results)})
        scores = await asyncio.wait_for(asyncio.to_thread(score, [list(s) for s in sequences]),
                                        self.config.timeout_s)
        trainer = dict(zip(sequences, scores))
        return {self.engines[i].url: probe.compare(f"{self._label(i)} at weight version "
                                                   f"{self.version}", prompts, results, trainer,
                                                   self.tolerance)
                for i, results in enumerate(per_engine)}

    async def close(self) -> None:
        """Close the engine clients. After colocated syncs the engines first get an update
        session without payloads: a CPU engine lets go of the trainer's shared-memory files it
        kept mapped (KeptMappings), so they go when the trainer does, even if the engines are
        killed later (SGLang keeps none: a no-op there)."""
        if self.version > 0 and self.config.transport == "colocated":
            everyone = set(range(len(self.engines)))
            try:
                await asyncio.wait_for(self._each(everyone, _empty_session, "an empty update session",
                                                  set(), quiet=True), timeout=30)
            except asyncio.TimeoutError:
                log.warning("engines did not close an empty update session within 30 s")
        for client in self.clients:
            await client.close()


async def _empty_session(client: HttpEngine) -> None:
    await client.begin_weight_update()
    await client.end_weight_update()
