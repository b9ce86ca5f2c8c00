"""The rollout router: spreads generate requests over engines and survives engine crashes.

It owns the set of engine processes and their clients: each request goes to the healthy engine
with the fewest requests in flight; an engine that stops answering (connection refused or reset,
process gone, /health failing three times, a request timing out) is killed, restarted on the
same port, given the current weights again, and only then used again, while its unfinished
requests are re-sent to whichever engine is healthy. Each `generate` call returns exactly one
answer or raises `RouterError` after `max_attempts` engines failed it: a re-sent request keeps
its rid and sampling seed, so it is the same request, and a killed engine never answered it.

Weights: `update_weights` pushes named tensors to every engine in one begin/end session per
engine (SGLang >= 0.5.21) and keeps a CPU copy of the latest value of every tensor it pushed
(plus the last `update_weights_from_disk` path), which is what a restarted engine is given.
Pass `resync=` to replace that copy by your own way of re-sending the weights (e.g. from the
trainer's GPUs), which avoids holding a second copy of the model in host memory.
While a weight sync owns the engines (`recovery_paused()`, held by the sync coordinator), a
failing engine is only taken out of service: the sync restarts and re-feeds it itself, and a
second restart, or a replay of older weights in the middle of the sync, would undo its work.
When the hold ends, a failed engine that answers again is taken back as it is; one that does not
is recovered as usual. It never generates, samples or computes anything itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Sequence

import torch

from or1_megatron.errors import OR1Error
from or1_megatron.rollout.engine import EngineUnavailable, GenerateResult, HttpEngine
from or1_megatron.rollout.launcher import EngineProcess
from or1_megatron.rollout.serialization import split_into_buckets

log = logging.getLogger(__name__)
Resync = Callable[[HttpEngine], Awaitable[None]]


class RouterError(OR1Error):
    """A request could not be served: every attempt hit a failed engine, or none came back."""


@dataclass
class _Slot:
    index: int
    process: EngineProcess
    client: HttpEngine
    healthy: bool = False
    inflight: int = 0
    health_failures: int = 0
    recovery: asyncio.Task | None = None
    served: int = 0
    history: list[str] = field(default_factory=list)
    # Its last recovery gave up (its node is gone, say). Cleared whenever a new failure, or a
    # weight sync's readmission, starts another attempt: waiters give up only when every
    # engine is down with nothing left to try.
    down: bool = False


class RolloutRouter:
    """Async front of N engine processes. Use `async with RolloutRouter(...)` or start/close."""

    def __init__(self, processes: Sequence[EngineProcess], *,
                 make_client: Callable[[EngineProcess], HttpEngine] | None = None,
                 max_attempts: int = 4, health_interval_s: float = 1.0,
                 health_failures_to_restart: int = 3, request_timeout_s: float = 600.0,
                 start_timeout_s: float = 300.0, wait_for_engine_s: float = 600.0,
                 bucket_bytes: int = 256 << 20, load_format: str | None = "flattened_bucket",
                 resync: Resync | None = None):
        if not processes:
            raise ValueError("a router needs at least one engine process")
        self._make_client = make_client or (lambda p: HttpEngine(
            p.url, tp_size=getattr(p, "tp_size", 1), timeout_s=request_timeout_s))
        self.slots = [_Slot(i, p, self._make_client(p)) for i, p in enumerate(processes)]
        self.max_attempts = max_attempts
        self.health_interval_s = health_interval_s
        self.health_failures_to_restart = health_failures_to_restart
        self.start_timeout_s = start_timeout_s
        self.wait_for_engine_s = wait_for_engine_s
        self.bucket_bytes = bucket_bytes
        self.load_format = load_format
        self.resync = resync
        self.weight_version: str | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._disk_path: str | None = None
        self._weights_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._health_task: asyncio.Task | None = None
        self._closed = False
        self._holds = 0  # recovery_paused() depth: >0 while a weight sync owns the engines
        self.resent = 0  # requests sent again after their engine failed
        self.health_rounds = 0  # completed passes of the health loop (observable by tests)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every engine that is not running, wait until all serve, start health checks."""
        for slot in self.slots:
            if not slot.process.alive():
                slot.process.start()
        await asyncio.gather(*(asyncio.to_thread(s.process.wait_ready, self.start_timeout_s)
                               for s in self.slots))
        for slot in self.slots:
            slot.healthy = True
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self, kill_engines: bool = True) -> None:
        """Stop health checks and recoveries, close clients and (by default) kill the engines."""
        self._closed = True
        tasks = [t for t in [self._health_task] + [s.recovery for s in self.slots] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self.slots:
            await slot.client.close()
            if kill_engines:
                await asyncio.to_thread(slot.process.kill)

    async def __aenter__(self) -> "RolloutRouter":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ generation

    async def generate(self, input_ids: Sequence[int], sampling_params: dict, *,
                       return_logprob: bool = True, rid: str | None = None) -> GenerateResult:
        """Generate one sample (sampling_params["n"] must be 1); retried across engine crashes."""
        if sampling_params.get("n", 1) != 1:
            raise ValueError("router.generate takes one sample per call; send n calls")
        rid = rid or uuid.uuid4().hex
        failures: list[str] = []
        for _ in range(self.max_attempts):
            slot = await self._pick()
            slot.inflight += 1
            try:
                [result] = await slot.client.generate([list(input_ids)], sampling_params,
                                                      return_logprob=return_logprob, rid=[rid])
                slot.served += 1
                return result
            except EngineUnavailable as exc:
                failures.append(f"engine {slot.index} ({slot.process.url}): {exc}")
                self._mark_failed(slot, str(exc))
                self.resent += 1
            finally:
                slot.inflight -= 1
        raise RouterError(f"request {rid} failed on {self.max_attempts} attempts:\n"
                          + "\n".join(failures))

    async def generate_many(self, prompts: Sequence[Sequence[int]],
                            sampling_params: dict | Sequence[dict], *,
                            return_logprob: bool = True) -> list[GenerateResult]:
        """One sample per prompt, spread over the engines, answers in prompt order."""
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, dict)
                  else list(sampling_params))
        return list(await asyncio.gather(*(
            self.generate(p, sp, return_logprob=return_logprob) for p, sp in zip(prompts, params))))

    async def _pick(self) -> _Slot:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self._closed or any(s.healthy for s in self.slots)
                    or all(s.down for s in self.slots)),
                    self.wait_for_engine_s)
            except asyncio.TimeoutError:
                raise RouterError(f"no healthy engine for {self.wait_for_engine_s:.0f} s") from None
        if self._closed:
            raise RouterError("the router is closed")
        if not any(s.healthy for s in self.slots):
            raise RouterError("every engine is down and could not be restarted: " + "; ".join(
                f"engine {s.index} ({s.process.url}): {s.history[-1] if s.history else 'down'}"
                for s in self.slots))
        return min((s for s in self.slots if s.healthy), key=lambda s: (s.inflight, s.index))

    # ------------------------------------------------------------ weights and control

    async def update_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], *,
                             weight_version: str | None = None) -> None:
        """Push tensors (HF names) to every healthy engine; a failing engine gets them on restart."""
        named = list(named_tensors)
        async with self._weights_lock:
            await self._on_healthy(lambda client: self._push(client, named, weight_version))
            # Record only what every engine accepted: a refused update raised above. With a
            # resync hook the caller re-feeds restarted engines, so no host copy is kept.
            if self.resync is None:
                for name, tensor in named:
                    self._weights[name] = tensor.detach().to("cpu", copy=True)
            self.weight_version = weight_version or self.weight_version

    async def update_weights_from_disk(self, model_path: str, *,
                                       weight_version: str | None = None) -> None:
        async def push(client: HttpEngine) -> None:
            await client.begin_weight_update()
            try:
                await client.update_weights_from_disk(model_path, weight_version=weight_version)
            finally:
                await client.end_weight_update()

        async with self._weights_lock:
            await self._on_healthy(push)
            self._disk_path, self._weights = model_path, {}
            self.weight_version = weight_version or self.weight_version

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._on_healthy(lambda client: client.pause_generation(mode))

    async def continue_generation(self) -> None:
        await self._on_healthy(lambda client: client.continue_generation())

    async def flush_cache(self) -> None:
        await self._on_healthy(lambda client: client.flush_cache())

    async def weight_versions(self) -> list[str | None]:
        async def version(slot: _Slot) -> str | None:
            try:
                return await slot.client.weight_version() if slot.healthy else None
            except EngineUnavailable:
                return None
        return list(await asyncio.gather(*(version(s) for s in self.slots)))

    async def _on_healthy(self, call: Callable[[HttpEngine], Awaitable[object]]) -> None:
        """Run `call` on every healthy engine; an unreachable one is restarted, not an error."""
        async def one(slot: _Slot) -> None:
            try:
                await call(slot.client)
            except EngineUnavailable as exc:
                self._mark_failed(slot, str(exc))
        await asyncio.gather(*(one(s) for s in self.slots if s.healthy))

    async def _push(self, client: HttpEngine, named: list[tuple[str, torch.Tensor]],
                    weight_version: str | None) -> None:
        buckets = split_into_buckets(named, self.bucket_bytes)
        await client.begin_weight_update()
        try:
            for i, bucket in enumerate(buckets):
                last = i == len(buckets) - 1  # the version moves once the last bucket is in
                await client.update_weights_from_tensor(
                    bucket, load_format=self.load_format, flush_cache=last,
                    weight_version=weight_version if last else None)
        finally:
            await client.end_weight_update()

    async def _replay(self, client: HttpEngine) -> None:
        """Give a restarted engine the current weights."""
        if self.resync is not None:
            await self.resync(client)
            return
        if self._disk_path is not None:
            await client.begin_weight_update()
            try:
                await client.update_weights_from_disk(self._disk_path,
                                                      weight_version=self.weight_version)
            finally:
                await client.end_weight_update()
        if self._weights:
            await self._push(client, list(self._weights.items()), self.weight_version)

    # ------------------------------------------------------------ failure handling

    @contextlib.asynccontextmanager
    async def recovery_paused(self) -> AsyncIterator[None]:
        """Hold restarts, replays and health checks (a weight sync owns the engines meanwhile).

        Entering waits for recoveries already running (they must not restart an engine under
        the sync); leaving takes back each engine that failed meanwhile: as it is if it answers
        /health (the sync restarted it with the new weights), else by a normal recovery."""
        self._holds += 1
        try:
            running = [s.recovery for s in self.slots if s.recovery and not s.recovery.done()]
            await asyncio.gather(*running, return_exceptions=True)
            yield
        finally:
            self._holds -= 1
            if self._holds == 0 and not self._closed:
                for slot in self.slots:
                    if slot.healthy and not slot.process.alive():  # died unnoticed meanwhile
                        slot.healthy = False
                        slot.history.append("process exited during a weight sync")
                    if not slot.healthy and (slot.recovery is None or slot.recovery.done()):
                        slot.down = False  # another attempt starts
                        slot.recovery = asyncio.create_task(self._readmit(slot))

    def _mark_failed(self, slot: _Slot, reason: str) -> None:
        if not slot.healthy or self._closed:
            return
        slot.healthy, slot.down = False, False
        slot.history.append(reason)
        if self._holds:
            log.warning("engine %d (%s) failed during a weight sync: %s; out of service until "
                        "the sync ends", slot.index, slot.process.url, reason)
            return
        log.warning("engine %d (%s) failed: %s; restarting it", slot.index, slot.process.url, reason)
        slot.recovery = asyncio.create_task(self._recover(slot))

    async def _readmit(self, slot: _Slot) -> None:
        """After a hold: serve again from an engine that answers, recover one that does not."""
        if slot.process.alive():
            await slot.client.close()  # its connections died with the old process
            slot.client = self._make_client(slot.process)
            if await slot.client.health():
                slot.health_failures = 0
                slot.healthy = True
                log.warning("engine %d (%s) is back after the weight sync", slot.index,
                            slot.process.url)
                async with self._changed:
                    self._changed.notify_all()
                return
        await self._recover(slot)

    async def _recover(self, slot: _Slot, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            try:
                async with self._weights_lock:  # replay a weight state no update is changing
                    await asyncio.to_thread(slot.process.restart)
                    await asyncio.to_thread(slot.process.wait_ready, self.start_timeout_s)
                    await slot.client.close()
                    slot.client = self._make_client(slot.process)
                    await self._replay(slot.client)
                slot.health_failures = 0
                slot.healthy = True
                log.warning("engine %d (%s) is back after restart %d", slot.index,
                            slot.process.url, slot.process.restarts)
                async with self._changed:
                    self._changed.notify_all()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying: the other engines keep serving meanwhile
                log.error("restarting engine %d failed (attempt %d/%d): %s",
                          slot.index, attempt, attempts, exc)
                slot.history.append(f"restart failed: {exc}")
        log.error("engine %d (%s) stays down after %d restart attempts", slot.index,
                  slot.process.url, attempts)
        slot.down = True
        async with self._changed:  # requests waiting for an engine must learn that none will come
            self._changed.notify_all()

    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.health_interval_s)
            for slot in self.slots:
                if not slot.healthy or self._holds:  # a sync may keep /health slow: no verdicts
                    continue
                if not slot.process.alive():
                    self._mark_failed(slot, f"process exited ({slot.process.exit_code()})")
                elif await slot.client.health():
                    slot.health_failures = 0
                else:
                    slot.health_failures += 1
                    if slot.health_failures >= self.health_failures_to_restart:
                        self._mark_failed(slot, f"/health failed {slot.health_failures} times")
            self.health_rounds += 1
