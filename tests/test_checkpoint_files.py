"""Checkpoint directory handling that needs no model: the interrupted-save fallback."""
import json

import pytest

from or1_megatron.errors import CheckpointError
from or1_megatron.policy.checkpoint import META_NAME, read_metadata, resolve_checkpoint_dir


def test_a_save_interrupted_between_renames_leaves_a_loadable_previous(tmp_path):
    final = tmp_path / "step_00010"
    previous = tmp_path / "step_00010.previous"
    previous.mkdir()
    (previous / META_NAME).write_text(json.dumps({"steps_done": 10}))
    assert resolve_checkpoint_dir(final) == previous
    assert read_metadata(final)["steps_done"] == 10
    final.mkdir()
    (final / META_NAME).write_text(json.dumps({"steps_done": 11}))
    assert resolve_checkpoint_dir(final) == final  # a complete checkpoint wins


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not an or1-megatron checkpoint"):
        read_metadata(tmp_path)
