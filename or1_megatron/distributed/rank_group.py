"""Trainer ranks that stay alive between calls: forked ranks driven by the parent process.

`run_forked` runs one function and exits; a weight sync needs the ranks to train, then push
when the coordinator asks, then score the probe batch, with the model kept in between. A
RankGroup forks the ranks once (through `run_forked`, in a background thread) and runs each
`call(fn, *args)` as `fn(state, *args)` on every rank, where `state` is what `setup` returned
on that rank. It is what the Ray worker group will be in the training loop; tests, the CPU demo
and tools/bench_weight_sync.py use it. Every wait is bounded.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any, Callable

from or1_megatron.distributed.cpu_results import require_cpu_tensors
from or1_megatron.distributed.fork_launcher import RankFailed, run_forked, start_method


def _serve(rank: int, world_size: int, setup: Callable[..., Any], setup_args: tuple,
           inboxes: list, outbox: Any) -> None:
    state = setup(rank, world_size, *setup_args)
    outbox.put((-1, rank, True, pickle.dumps(os.getpid())))  # ready
    while True:
        message = inboxes[rank].get()
        if message is None:
            # Free the state now (forked children exit without a garbage collection): shared
            # memory, e.g. a weight sender's bucket buffers, is unlinked when its last user
            # frees it, and exception tracebacks may hold it in reference cycles.
            del state
            gc.collect()
            return
        call_id, fn, args = message
        try:
            result = fn(state, *args)
            require_cpu_tensors(result, f"rank {rank}'s result of {getattr(fn, '__name__', fn)}")
            value = pickle.dumps(result)
            outbox.put((call_id, rank, True, value))
        except BaseException:
            outbox.put((call_id, rank, False, traceback.format_exc()))
            raise


class RankGroup:
    """`world_size` forked ranks, each holding `setup(rank, world_size, *args)` as its state."""

    def __init__(self, world_size: int, setup: Callable[..., Any], *args: Any,
                 backend: str = "gloo", timeout_s: float = 300.0):
        self._method = start_method(backend)  # spawn for GPU ranks or after CUDA init
        ctx = mp.get_context(self._method)
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._outbox = ctx.Queue()
        self._error: BaseException | None = None
        self._calls = 0
        self.pids: list[int] = []
        self._thread = threading.Thread(target=self._run, args=(setup, args), daemon=True)
        self._thread.start()
        self.pids = self._collect(-1, timeout_s)

    def _run(self, setup: Callable[..., Any], args: tuple) -> None:
        try:
            run_forked(_serve, self.world_size, setup, args, self._inboxes, self._outbox,
                       backend=self.backend, timeout_s=float("inf"), method=self._method)
        except BaseException as exc:  # reported by the next call
            self._error = exc

    def share(self, value: Any) -> Any:
        """RayRankGroup.share's interface; forked ranks get every argument pickled per call."""
        return value

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Run `fn(state, *args)` on every rank; the results in rank order."""
        self._calls += 1
        for inbox in self._inboxes:
            inbox.put((self._calls, fn, args))
        return self._collect(self._calls, timeout_s or self.timeout_s)

    def _collect(self, call_id: int, timeout_s: float) -> list[Any]:
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) < self.world_size:
            try:
                got_id, rank, ok, value = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RankFailed(f"the rank group stopped: {self._error}") from None
                if time.monotonic() > deadline:
                    self.close(force=True)
                    raise RankFailed(f"call {call_id} did not finish within {timeout_s:.0f} s") from None
                continue
            if not ok:
                self.close(force=True)
                raise RankFailed(f"rank {rank} failed in call {got_id}:\n{value}")
            if got_id == call_id:
                results[rank] = pickle.loads(value)
        return [results[rank] for rank in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        """Stop the ranks (at once if `force`: run_forked then kills the ones still running)."""
        if not self._thread.is_alive():
            return
        for inbox in self._inboxes:
            inbox.put(None)
        self._thread.join(timeout=1 if force else self.timeout_s)
        if self._thread.is_alive():  # ranks stuck in a collective: stop them
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._thread.join(timeout=10)

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(force=exc[0] is not None)
