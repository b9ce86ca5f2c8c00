"""Fixes for megatron-core defects (`policy/megatron_fixes.py`), each against the real megatron.

The recompute fix is exercised by the gradient oracle (selective recompute) and the planner's
calibration; here: the checkpoint writer's queue server must not outlive a killed rank."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

RANK_LIKE = f"""
import multiprocessing, sys
sys.path.insert(0, {str(REPO)!r})
from or1_megatron.policy.megatron_fixes import apply_megatron_fixes
from megatron.core.dist_checkpointing.strategies import filesystem_async
apply_megatron_fixes()
queue = filesystem_async._get_write_results_queue()  # what the writer calls at the first save
queue.put("written")
assert queue.get() == "written"
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
sys.stdin.read()  # until killed
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_checkpoint_queue_server_exits_when_its_rank_is_killed():
    rank = subprocess.Popen([sys.executable, "-c", RANK_LIKE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = rank.stdout.readline()
        servers = [int(pid) for pid in line.split()]
        assert servers, f"no queue server started (rank exited with {rank.poll()})"
        assert not any(_gone(pid) for pid in servers)
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not all(_gone(pid) for pid in servers):
        if time.monotonic() > deadline:
            for pid in servers:  # do not leave it behind for the next test either
                psutil.Process(pid).kill()
            pytest.fail(f"queue server(s) {servers} still alive 30 s after their rank was killed")
        time.sleep(0.1)
