"""The metadata file of a policy checkpoint, and finding a complete checkpoint on disk.

Torch-free, so the driver of a run and the tools can pick a checkpoint without importing
megatron; `policy.checkpoint` writes what this module reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from or1_megatron.errors import CheckpointError

META_NAME = "or1_checkpoint.json"


def previous_dir(final: Path) -> Path:
    """Where a save moves the checkpoint it replaces until the new one has its name."""
    return final.with_name(final.name + ".previous")


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
