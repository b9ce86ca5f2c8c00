"""Where a run's checkpoints live, which one a resume takes, and which ones are pruned.

`<run_dir>/checkpoints/step_NNNNNNN/` is a policy dist checkpoint (weights, optimizer, scheduler)
whose extra state is the driver's `TrainerState` (step, stage, sampler, entropy controller,
online-filter counts, RNG). A directory counts only once its metadata file exists, which the
atomic save writes last, so a run killed mid-save resumes from the previous one.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

from or1_megatron.errors import CheckpointError
from or1_megatron.policy.checkpoint_meta import read_metadata, resolve_checkpoint_dir

PREFIX = "step_"


class StepDirs:
    """Directories `<root>/step_NNNNNNN`, one per saved step."""

    def __init__(self, root: Path):
        self.root = root

    def for_step(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:07d}"

    def numbered(self) -> Iterator[tuple[int, Path]]:
        """(step, directory) of every `step_N` (not its `.saving`/`.previous` siblings)."""
        for path in self.root.glob(f"{PREFIX}*"):
            suffix = path.name[len(PREFIX):]
            if suffix.isdigit():
                yield int(suffix), path


class CheckpointDirs(StepDirs):
    def __init__(self, run_dir: str | Path):
        super().__init__(Path(run_dir) / "checkpoints")

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every complete checkpoint, oldest first (save leftovers are
        reached through resolve_checkpoint_dir)."""
        found = []
        for step, path in self.numbered():
            try:
                read_metadata(path)
            except (CheckpointError, ValueError, OSError):
                continue
            found.append((step, resolve_checkpoint_dir(path)))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        done = self.complete()
        return done[-1] if done else None

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints (with their save leftovers)."""
        for step, _ in self.complete()[:-keep]:
            base = self.for_step(step)
            for path in (base, base.with_name(base.name + ".previous"),
                         base.with_name(base.name + ".saving")):
                shutil.rmtree(path, ignore_errors=True)
