"""Leftover /dev/shm payload files: a weight sync's start removes those nobody can free, only those.

A child process stands for a crashed trainer: it shares two tensors, pickles each (adding the
reference a receiver would drop) and is killed before any receiver decoded them, so both files
outlive it. This process then maps one of them, as an engine still holding a payload would.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from or1_megatron.config.schema import SyncConfig
from or1_megatron.rollout.launcher import AttachedEngine
from or1_megatron.rollout.serialization import SharedPayload, decode_named_tensors
from or1_megatron.rollout.shm import SHM_DIR
from or1_megatron.sync.coordinator import WeightSyncCoordinator

_TRAINER = """
import os, sys, time
import torch
from or1_megatron.rollout.serialization import SharedPayload
print(os.getpid())
for value in (1.0, 2.0):
    print(SharedPayload([("w", torch.full((1000,), value))], None).texts[0])
sys.stdout.flush()
time.sleep(120)
"""


def _crashed_trainer() -> tuple[int, list[str]]:
    """Its pid and two payloads. Killed with its whole process group: torch's shm manager, which
    unlinks a client's files when the client exits, dies with it, as in a crashed run."""
    process = subprocess.Popen([sys.executable, "-c", _TRAINER], stdout=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        pid = int(process.stdout.readline())
        payloads = [process.stdout.readline().strip() for _ in range(2)]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    return pid, payloads


def _files(pid: int) -> list[str]:
    gc.collect()
    return sorted(f for f in os.listdir(SHM_DIR) if f.startswith(f"torch_{pid}_"))


def test_a_sync_start_removes_files_of_dead_processes_that_nobody_maps():
    pid, [_never_decoded, held] = _crashed_trainer()
    files = _files(pid)
    assert len(files) == 2  # both outlive their creator
    [(_, kept)] = decode_named_tensors(held, None)  # mapped here, like an engine's payload
    mine = SharedPayload([("x", torch.ones(10))], None)  # a live creator's file

    WeightSyncCoordinator([AttachedEngine("http://127.0.0.1:9")], SyncConfig(), vocab_size=8)

    [left] = _files(pid)  # the unmapped one is gone
    assert left in files and torch.equal(kept, torch.full((1000,), 2.0))
    assert _files(os.getpid())  # a live creator's file stays
    # Letting go of the mapped one unlinks it as usual (torch would abort this process had the
    # sweep removed the file under it: its own unlink would fail).
    del kept
    assert _files(pid) == []
    mine.release(delivered=False)
    del mine
    assert _files(os.getpid()) == []


def test_a_user_sweeps_only_their_own_files(tmp_path):
    """A non-root user cannot unlink other users' files in the sticky /dev/shm (the sweep raised
    PermissionError and `or1 train` died at start for such a user): only the owner's are swept."""
    import pytest

    from or1_megatron.rollout.shm import remove_stale_shm_files

    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    exited = subprocess.Popen(["true"])
    exited.wait()
    dead_pid = exited.pid  # a creator that no longer runs
    mine, theirs = tmp_path / f"torch_{dead_pid}_1", tmp_path / f"torch_{dead_pid}_2"
    for path in (mine, theirs):
        path.write_bytes(b"x")
    os.chown(theirs, 54321, 54321)
    assert remove_stale_shm_files(tmp_path, owner=os.geteuid()) == [mine]
    assert theirs.exists() and not mine.exists()
    for path in tmp_path.glob(f"torch_{dead_pid}_*"):
        path.unlink()
