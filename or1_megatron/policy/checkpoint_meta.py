"""The metadata file of a policy checkpoint, and finding a complete checkpoint on disk.

Torch-free, so the driver of a run and the tools can pick a checkpoint without importing
megatron; `policy.checkpoint` writes what this module reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from or1_megatron.errors import CheckpointError

META_NAME = "or1_checkpoint.json"


def previous_dir(final: Path) -> Path:
    """Where a save moves the checkpoint it replaces until the new one has its name."""
    return final.with_name(final.name + ".previous")


def replace_directory(staging: Path, final: Path) -> None:
    """Give the complete directory `staging` the name `final`. An existing `final` is moved to
    `previous_dir(final)` first and removed only after the rename, so there is never a moment
    without a complete directory under one of the two names (`resolve_checkpoint_dir` finds it)."""
    if final.exists() and not any(final.iterdir()):
        final.rmdir()
    previous = previous_dir(final)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """`directory`, or the copy a save interrupted between its two renames left beside it."""
    directory = Path(directory)
    if not (directory / META_NAME).is_file() and (previous_dir(directory) / META_NAME).is_file():
        return previous_dir(directory)
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint_dir(directory) / META_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an or1-megatron checkpoint (no {META_NAME})")
    return json.loads(path.read_text())
