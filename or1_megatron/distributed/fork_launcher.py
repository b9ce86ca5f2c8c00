"""Run a function on N forked ranks joined in a process group, and collect what each returns.

Forking from a parent that already imported torch and megatron makes a world-4 job start in
under a second (spawning costs 11-17 s), which is what lets the parallel-vs-single-process
oracle tests run in CI. Used by tests, the converter and the `or1 check` smoke command; the
real trainer places its ranks with Ray instead.

On GPU machines two rules hold. A parent that has initialised CUDA (`import megatron.core`
does) cannot fork ranks that use CUDA: the ranks are then spawned instead, which needs `fn`
and its arguments to be picklable. And what a rank returns must be CPU tensors (checked on the
rank): a CUDA tensor unpickled here would initialise CUDA in the parent. The backend is the
caller's choice: NCCL needs one GPU per rank and CUDA tensors in every collective.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch

from or1_megatron.distributed.cpu_results import require_cpu_tensors


class RankFailed(RuntimeError):
    """A forked rank raised, crashed or timed out; the message carries its traceback."""


class LaunchError(RuntimeError):
    """The ranks cannot be started as asked (backend, GPUs)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BACKENDS = ("gloo", "nccl")


def start_method(backend: str = "gloo") -> str:
    """"fork" (fast) for CPU ranks; "spawn" for GPU ranks, and wherever this process has
    initialised CUDA (a forked child cannot use CUDA then)."""
    return "spawn" if backend == "nccl" or torch.cuda.is_initialized() else "fork"


def check_backend(backend: str, world_size: int) -> None:
    """A LaunchError unless `backend` can run `world_size` ranks on this machine."""
    if backend not in BACKENDS:
        raise LaunchError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if world_size > gpus:
            raise LaunchError(f"backend 'nccl' needs one GPU per rank: {world_size} ranks, "
                              f"{gpus} GPU(s) visible; use backend='gloo' for CPU tensors")


def _rank_main(fn, rank: int, world_size: int, port: int, backend: str, args: tuple,
               results: mp.Queue) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if backend == "nccl":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        value = fn(rank, world_size, *args)
        require_cpu_tensors(value, f"rank {rank}'s result")
    except BaseException:  # report everything, including SystemExit, to the parent
        # No barrier here: the other ranks may be blocked in a collective with this one, and
        # the parent kills them as soon as it reads this error.
        results.put((rank, False, traceback.format_exc()))
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Plain pickle copies tensors by value; the queue's own pickler would pass file
    # descriptors that die with this process.
    results.put((rank, True, pickle.dumps(value)))


def run_forked(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
    timeout_s: float = 300.0, method: str | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks joined by ``backend``.

    The ranks are forked (spawned for NCCL and where this process has initialised CUDA;
    `method` overrides).
    Returns the per-rank return values (CPU only) in rank order. Raises RankFailed with the
    failing rank's traceback if any rank raises, returns a non-CPU tensor, dies or does not
    finish within ``timeout_s``.
    """
    check_backend(backend, world_size)
    ctx = mp.get_context(method or start_method(backend))
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, backend, args, results))
        for rank in range(world_size)
    ]
    for started, proc in enumerate(procs):
        try:
            proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            for other in procs[:started]:
                other.kill()
                other.join()
            raise LaunchError(f"{ctx.get_start_method()}ed ranks need a picklable function and "
                              f"arguments (this process initialised CUDA, so ranks cannot be "
                              f"forked): {exc}") from exc
    collected: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        # Drain the queue before joining: a child blocks on exit until its queued result is read.
        while len(collected) < world_size and not errors:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = {i: p.exitcode for i, p in enumerate(procs) if p.exitcode not in (None, 0)}
                if dead:
                    raise RankFailed(f"ranks died without a result (rank: exit code) {dead}") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks did not finish within {timeout_s:.0f}s") from None
                continue
            if ok:
                collected[rank] = pickle.loads(value)
            else:
                # The other ranks are probably blocked in a collective with this one: stop now.
                errors.append(f"rank {rank} failed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=0.5 if errors else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RankFailed("\n".join(errors))
    return [collected[rank] for rank in range(world_size)]
