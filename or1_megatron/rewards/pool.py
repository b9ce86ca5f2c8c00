"""A pool of reward worker processes that no response can crash or hang.

Owns scheduling, per-task deadlines and worker replacement. Each worker runs `compute_score`
with its own sandbox uid, counting down from `SandboxConfig.uid` (worker i: uid - i), because
process-count limits are per uid: one program's fork bomb must not stop the programs of another
worker from starting. Throwaway directories go under a root of the pool's, removed on close. A task that raises, kills its worker or outlives
its deadline scores 0 and is reported in `RewardPool.errors`; the worker is replaced.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

from or1_megatron.rewards.config import RewardConfig

logger = logging.getLogger(__name__)

# Added to the code time limit for the task deadline: harness start-up and math-verify work.
_DEADLINE_MARGIN_S = 30.0


def _worker_main(conn: Connection, config: RewardConfig, reward_modules: Sequence[str]) -> None:
    import importlib

    from or1_megatron.rewards.registry import compute_score, set_reward_config
    from or1_megatron.rewards.sandbox import SandboxError

    # The pool's owner decides when scoring stops: a SIGTERM sent to every process of a job
    # (a scheduler's time limit) must not turn the rest of a step's rewards into zeros while
    # the trainer checkpoints. An owner that dies closes the pipe, which ends the worker.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_reward_config(config)
    for module in reward_modules:  # plug-ins register their rewards when imported
        importlib.import_module(module)
    conn.send(None)  # ready: task deadlines must not include this start-up (imports take seconds)
    while True:
        message = conn.recv()
        if message is None:
            return
        index, task = message
        try:
            conn.send((index, float(compute_score(**task)), ""))
        except SandboxError as exc:  # no isolation: every code reward would be a silent 0
            conn.send((index, None, f"sandbox unusable: {exc}"))
        except Exception as exc:  # a bad row or a reward bug scores 0 and is reported, never fatal
            conn.send((index, 0.0, f"{type(exc).__name__}: {exc}"))


# How long a spawned worker may take to import its modules before the pool gives up on it.
_STARTUP_TIMEOUT_S = 180.0


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Connection
    index: int
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0  # of its start-up while not ready, then of its task


class RewardPool:
    """Score many responses in parallel: `pool.map(tasks)` with verl's compute_score keywords."""

    def __init__(self, num_workers: int = 2, config: RewardConfig | None = None,
                 task_timeout_s: float | None = None, reward_modules: Sequence[str] = ()) -> None:
        """reward_modules: modules that call `register_reward` on import; each worker imports them
        (workers are spawned, so rewards registered only in the caller's process are unknown there)."""
        self.config = config or RewardConfig()
        self.reward_modules = list(reward_modules)
        self.num_workers = num_workers
        self.task_timeout_s = task_timeout_s or (self.config.code_total_timeout_s + _DEADLINE_MARGIN_S)
        self._tmp_root = tempfile.mkdtemp(prefix="or1-rewards-")
        # spawn, not fork: the trainer process holds threads (torch, ray) that fork would corrupt.
        self._ctx = mp.get_context("spawn")
        self._workers = [self._start(i) for i in range(num_workers)]
        self.errors: list[tuple[int, str]] = []

    def _worker_config(self, index: int) -> RewardConfig:
        sandbox = dataclasses.replace(self.config.sandbox, uid=self.config.sandbox.uid - index,
                                      tmp_root=self.config.sandbox.tmp_root or self._tmp_root)
        return dataclasses.replace(self.config, sandbox=sandbox)

    def _start(self, index: int) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self._worker_config(index), self.reward_modules),
                                    daemon=True, name=f"or1-reward-{index}")
        process.start()
        child.close()
        return _Worker(process=process, conn=parent, index=index,
                       deadline=time.monotonic() + _STARTUP_TIMEOUT_S)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()
        fresh = self._start(worker.index)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def map(self, tasks: Sequence[dict[str, Any]]) -> list[float]:
        """Scores in task order. Each task holds compute_score's keyword arguments."""
        self.errors = []
        scores = [0.0] * len(tasks)
        todo = list(range(len(tasks)))[::-1]
        while todo or any(w.task is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.task is None and todo:
                    self._send(worker, todo.pop(), tasks, todo)
            # Wait on workers still starting and workers with a task.
            waiting = {w.conn: w for w in self._workers if not w.ready or w.task is not None}
            nearest = min(w.deadline for w in waiting.values())
            for conn in wait(list(waiting), timeout=max(0.0, nearest - time.monotonic())):
                worker = waiting[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if not worker.ready:  # a worker that cannot even start would die again
                        raise RuntimeError(f"reward worker {worker.index} died while starting "
                                           f"(reward modules: {self.reward_modules})") from None
                    self._report(worker.task, "reward worker died")
                    self._replace(worker)
                    continue
                if message is None:
                    worker.ready = True
                    continue
                index, score, error = message
                worker.task = None
                if score is None:
                    raise RuntimeError(f"reward task {index}: {error}")
                scores[index] = score
                if error:
                    self._report(index, error)
            now = time.monotonic()
            for worker in waiting.values():
                if worker.deadline > now or not any(w is worker for w in self._workers):
                    continue
                if not worker.ready:
                    raise RuntimeError(f"reward worker {worker.index} did not start within "
                                       f"{_STARTUP_TIMEOUT_S:.0f} s (reward modules: {self.reward_modules})")
                if worker.task is not None:  # (a result that arrived in this pass is not late)
                    self._report(worker.task, f"timed out after {self.task_timeout_s:.0f} s")
                    self._replace(worker)
        return scores

    def _send(self, worker: _Worker, index: int, tasks: Sequence[dict[str, Any]], todo: list[int]) -> None:
        try:
            worker.conn.send((index, tasks[index]))
        except OSError:  # the worker died while idle (e.g. killed for memory): its fresh
            self._replace(worker)  # replacement takes the task once it is ready
            todo.append(index)
            return
        worker.task, worker.deadline = index, time.monotonic() + self.task_timeout_s

    def _report(self, index: int, error: str) -> None:
        self.errors.append((index, error))
        logger.warning("reward task %d scored 0: %s", index, error)

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
        shutil.rmtree(self._tmp_root, ignore_errors=True)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
