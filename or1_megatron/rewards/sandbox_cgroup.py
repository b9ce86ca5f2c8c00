"""Resource bounds for one sandboxed run as a whole: a cgroup caps the memory of all its
processes together (page cache, tmpfs and memfds included: shared memory is charged to the
cgroup) and how many processes exist at once. Per-process rlimits alone let 16 processes of
2 GiB each, or memfds, take the host's memory.

cgroup v2 (one unified hierarchy, below this process's own cgroup, with the memory and pids
controllers delegated) or v1 (the memory and pids hierarchies). `CgroupBounds.detect()` probes
once; where neither can be used (no delegation, read-only cgroupfs) it returns None with the
reason, and the sandbox says so at start and keeps the per-process rlimits only.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(Exception):
    """This machine offers no writable cgroup with the memory and pids controllers."""


@dataclass
class CgroupBounds:
    """Where per-run cgroups are made: one parent directory per controller (v1), or one (v2)."""

    version: int
    parents: dict[str, Path]  # controller ("memory", "pids", or "unified") -> parent directory

    @classmethod
    def detect(cls) -> "CgroupBounds":
        """The usable layout, after making and removing a probe cgroup; CgroupUnavailable
        naming why otherwise."""
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            bounds = cls(2, {"unified": _parent(CGROUP_ROOT, "")})
        else:
            bounds = cls(1, {c: _parent(CGROUP_ROOT / c, c) for c in ("memory", "pids")})
        probe = bounds.create(memory_bytes=64 << 20, max_processes=4)
        bounds.remove(probe, timeout_s=5.0)
        return bounds

    def create(self, memory_bytes: int, max_processes: int) -> list[Path]:
        """A new cgroup (one directory per hierarchy) with the two limits written."""
        name = f"or1-sandbox-{uuid.uuid4().hex[:12]}"
        made: list[Path] = []
        try:
            for controller, parent in self.parents.items():
                path = parent / name
                path.mkdir()
                made.append(path)
                if self.version == 2:
                    _write(path / "memory.max", memory_bytes)
                    _write(path / "memory.swap.max", 0, optional=True)
                    _write(path / "pids.max", max_processes)
                elif controller == "memory":
                    _write(path / "memory.limit_in_bytes", memory_bytes)
                else:
                    _write(path / "pids.max", max_processes)
        except OSError as exc:
            for path in made:
                _rmdir(path)
            raise CgroupUnavailable(f"cannot make a cgroup under {self.parents}: {exc}") from exc
        return made

    @staticmethod
    def enter_command(cgroups: list[Path]) -> list[str]:
        """A prefix that moves the command into `cgroups` before it runs (so its very first
        child is already bounded): `sh -c 'echo $$ > .../cgroup.procs ... ; exec "$@"'`."""
        moves = " && ".join(f"echo $$ > '{path / 'cgroup.procs'}'" for path in cgroups)
        return ["sh", "-c", f"{moves} && exec \"$@\"", "sh"]

    @staticmethod
    def remove(cgroups: list[Path], timeout_s: float = 10.0) -> None:
        """Remove the run's cgroups once their processes are gone (bounded wait; a cgroup that
        cannot be removed stays, empty of limits' consequence, and is left to the caller's log)."""
        for path in cgroups:
            deadline = time.monotonic() + timeout_s
            while not _rmdir(path) and time.monotonic() < deadline:
                time.sleep(0.02)  # the last killed process is still being reaped

    @staticmethod
    def peak_memory(cgroups: list[Path]) -> int | None:
        for path in cgroups:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                try:
                    return int((path / name).read_text())
                except (OSError, ValueError):
                    continue
        return None


def _parent(mount: Path, controller: str) -> Path:
    """This process's own cgroup in a hierarchy mounted at `mount` (the mount itself where a
    cgroup namespace shows it as the root)."""
    own = mount / _own_cgroup(controller)
    return own if own.is_dir() else mount


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in `controller`'s hierarchy ("" for v2's unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers.split(",") == [controller] or (controller == "" and controllers == ""):
            return path.lstrip("/")
    raise CgroupUnavailable(f"no {controller or 'unified'} cgroup in /proc/self/cgroup")


def _write(path: Path, value: int, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not optional:
            raise


def _rmdir(path: Path) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
