"""Fixes for megatron-core defects that break this project's GPU path without transformer-engine.

Unlike `cpu_compat` (which adapts CUDA-only code to CPUs), these apply on every device and are
idempotent; `build_policy_model` applies them before building a model.

- megatron-core 0.16.1's `CheckpointWithoutOutput(fp8=False)` sets ``self.fp8 = fp8 is not
  None`` (True), then asks transformer-engine's FP8 state manager, which is not imported without
  TE: selective recompute of the norms raises NameError on the local spec (CPU or GPU). Without
  TE there is no FP8, so the flag is cleared.
- dist_checkpointing's file writer collects its results through a queue served by a spawned
  `multiprocessing` Manager, one per rank, started at the first save and never stopped. When a
  rank is killed (a SIGKILLed driver takes its Ray actors down) that server lives on as an
  orphan holding ~380 MB, one per rank per killed run. The queue now comes from a Manager whose
  server exits when its parent process is gone.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from multiprocessing.managers import SyncManager

_APPLIED = {"done": False}
_RESULTS_QUEUE: dict = {}
# How often the checkpoint writer's queue server checks that the rank that started it is alive.
_PARENT_POLL_S = 1.0


def exit_when_parent_dies(parent_pid: int) -> None:
    """Manager initializer: a daemon thread ends this server once `parent_pid` is no longer its
    parent (the kernel re-parents orphans), so a killed rank leaves no process behind."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def checkpoint_results_queue():
    """Replacement for megatron's `filesystem_async._get_write_results_queue` (same contract:
    one Manager-served queue per process, created on first use)."""
    if "queue" not in _RESULTS_QUEUE:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=exit_when_parent_dies, initargs=(os.getpid(),))
        _RESULTS_QUEUE["manager"] = manager  # the server stops if its manager is collected
        _RESULTS_QUEUE["queue"] = manager.Queue()
    return _RESULTS_QUEUE["queue"]


def apply_megatron_fixes() -> None:
    if _APPLIED["done"]:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    if not mcore_random.HAVE_TE:
        original_init = mcore_random.CheckpointWithoutOutput.__init__

        @functools.wraps(original_init)
        def init_without_fp8(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.fp8 = False

        mcore_random.CheckpointWithoutOutput.__init__ = init_without_fp8

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._get_write_results_queue = checkpoint_results_queue
    _APPLIED["done"] = True
