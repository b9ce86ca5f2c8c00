"""Leftover shared-memory files of weight payloads: finding and removing the ones nobody can free.

A CPU weight payload lives in a `/dev/shm/torch_<creator pid>_*` file that torch unlinks when the
last process mapping it lets go (serialization.py keeps that count right). A process killed while
it held a reference (a crashed trainer, an engine killed mid-update) never lets go, so its files
stay until the machine reboots: a few GB per crashed run with 512 MB buckets. This module sweeps
them when a weight sync starts. It never touches a file that some live process still maps, nor one
whose creator still runs: torch aborts a process whose own unlink of such a file fails. A user
other than root sweeps only their own files (they cannot unlink other users' in the sticky
/dev/shm, and must not try).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_SHM_NAME = re.compile(r"^torch_(\d+)_")


def _default_owner() -> int | None:
    return None if os.geteuid() == 0 else os.geteuid()


def remove_stale_shm_files(shm_dir: Path = SHM_DIR, proc_dir: Path = Path("/proc"),
                           owner: int | None = -1) -> list[Path]:
    """Unlink the `torch_<pid>_*` files whose creator is gone and that no live process maps.
    `owner`: only files of this uid (None: anyone's; the default: this user's, anyone's for root)."""
    owner = _default_owner() if owner == -1 else owner
    dead = {}
    for path in shm_dir.glob("torch_*"):
        match = _SHM_NAME.match(path.name)
        if match and not _pid_alive(int(match.group(1))) and _owned_by(path, owner):
            dead[path.name] = path
    if dead:
        for name in _mapped_names(proc_dir):
            dead.pop(name, None)
    removed, size = [], 0
    for path in dead.values():
        try:
            nbytes = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # its last user let go meanwhile, which unlinked it
            continue
        except PermissionError:  # not ours to remove after all: leave it to its owner
            log.debug("cannot remove %s: not permitted", path)
            continue
        removed.append(path)
        size += nbytes
    if removed:
        log.warning("removed %d shared-memory files left by dead processes in %s (%.1f MB)",
                    len(removed), shm_dir, size / 1e6)
    return removed


def _owned_by(path: Path, owner: int | None) -> bool:
    try:
        return owner is None or path.stat().st_uid == owner
    except FileNotFoundError:
        return False


def _mapped_names(proc_dir: Path) -> set[str]:
    """Base names of every torch_* file some process maps now (/proc/<pid>/maps)."""
    names = set()
    for maps in proc_dir.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone meanwhile, or another user's (it cannot map our 0600 files)
            continue
        for line in text.splitlines():
            marker = line.find("/torch_")
            if marker >= 0:
                names.add(line[marker + 1:].split()[0])
    return names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

