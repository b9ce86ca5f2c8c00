"""Saving and loading the policy as a Megatron dist checkpoint, reshardable to any TP/PP.

A checkpoint directory holds megatron's sharded tensors (the model, and optionally the
distributed optimizer's state in its reshardable format), the lr scheduler, the caller's extra
state (controller, data sampler...), and `or1_checkpoint.json`: the architecture and layout it
was saved with, checked on load so a wrong model is named, not loaded. Saves are atomic: files
go to a temporary sibling directory that is renamed into place once every rank is done.
Used by the trainer (through PolicyWorker) and by the checkpoint converter (model only).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from or1_megatron.convert.hf_config import Qwen2Arch
from or1_megatron.convert.hf_export import HF_SUBDIR, carry_hf_files
from or1_megatron.errors import CheckpointError
from or1_megatron.policy.checkpoint_meta import META_NAME, read_metadata, replace_directory, resolve_checkpoint_dir

FORMAT_VERSION = 1
# The distributed optimizer's canonical per-parameter format: loadable at any TP/PP/DP.
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class PolicyState:
    """What a checkpoint saves or fills: this rank's model stage and, for training, its optimizer."""

    model: torch.nn.Module
    arch: Qwen2Arch
    padded_vocab: int
    layout: dict[str, Any]               # tensor_parallel, pipeline_parallel, world_size, dtype
    optimizer: Optional[Any] = None      # megatron optimizer
    scheduler: Optional[Any] = None      # megatron OptimizerParamScheduler
    steps_done: int = 0

    @property
    def has_optimizer(self) -> bool:
        return self.optimizer is not None


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the state tensors a checkpoint load fills in place.

    Before its first step torch's Adam has no state (not even `step`), and megatron's
    distributed optimizer cannot describe what it would load. A zero-gradient step creates it;
    every value it touches is overwritten by the load that follows.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _sharded_state(state: PolicyState, is_loading: bool) -> dict[str, Any]:
    if state.has_optimizer and is_loading:
        _materialise_optimizer_state(state.optimizer)
    model_sd = state.model.sharded_state_dict(metadata=_SHARDING)
    out: dict[str, Any] = {"model": model_sd}
    if state.has_optimizer:
        out["optimizer"] = state.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_SHARDING)
        out["scheduler"] = state.scheduler.state_dict()
    return out


def save_checkpoint(state: PolicyState, directory: str | Path, extra_state: dict[str, Any] | None = None,
                    carried_from: str | Path | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. `carried_from`:
    an HF checkpoint whose config and tokenizer files go with it (in `hf/`), so that
    `or1 convert mcore-to-hf` gives a complete HF checkpoint back."""
    final = Path(directory)
    staging = final.with_name(final.name + ".saving")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    sharded = _sharded_state(state, is_loading=False)
    sharded["extra_state"] = extra_state or {}
    sharded["steps_done"] = state.steps_done
    dist_checkpointing.save(sharded, str(staging))
    torch.distributed.barrier()
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "arch": state.arch.to_dict(),
            "padded_vocab_size": state.padded_vocab,
            "saved_with": state.layout,
            "steps_done": state.steps_done,
            "with_optimizer": state.has_optimizer,
        }
        if carried_from:
            carry_hf_files(carried_from, staging / HF_SUBDIR)
        (staging / META_NAME).write_text(json.dumps(meta, indent=2))
        # Never a moment without a complete checkpoint on disk (a crash leaves `.previous`).
        replace_directory(staging, final)
    torch.distributed.barrier()
    return final


def check_compatible(state: PolicyState, directory: str | Path) -> dict[str, Any]:
    """Refuse, by field, a checkpoint of another architecture or vocabulary padding."""
    meta = read_metadata(directory)
    saved, ours = meta["arch"], state.arch.to_dict()
    for key, value in ours.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{directory}: saved with {key}={saved.get(key)!r}, but the policy has {key}={value!r}"
            )
    if meta["padded_vocab_size"] != state.padded_vocab:
        raise CheckpointError(
            f"{directory}: vocabulary padded to {meta['padded_vocab_size']} rows, the policy pads to "
            f"{state.padded_vocab} (set model.make_vocab_size_divisible_by to match)"
        )
    return meta


def _saved_keys(directory: Path) -> set[str]:
    return set(load_sharded_metadata(str(directory)))


def drop_absent_extra_state(model_sd: dict[str, Any], saved_keys: set[str]) -> list[str]:
    """Remove from a loading template the `_extra_state` entries (transformer-engine's FP8
    metadata) that the checkpoint lacks (one saved by the local spec, or by the converter), so
    it loads under TE; returns their state-dict keys. Parameters are never dropped."""
    absent = [name for name, value in model_sd.items()
              if name.endswith("_extra_state") and getattr(value, "key", name) not in saved_keys]
    for name in absent:
        del model_sd[name]
    return absent


def load_checkpoint(state: PolicyState, directory: str | Path) -> dict[str, Any]:
    """Collective: fill the model (and optimizer/scheduler, if `state` has them) at this layout.

    Sets `state.steps_done` and returns the caller's extra state saved with the checkpoint.
    """
    directory = resolve_checkpoint_dir(directory)
    meta = check_compatible(state, directory)
    if state.has_optimizer and not meta.get("with_optimizer", False):
        raise CheckpointError(f"{directory}: saved without optimizer state (weights only)")
    template = _sharded_state(state, is_loading=True)
    template["extra_state"] = None
    template["steps_done"] = None
    absent = drop_absent_extra_state(template["model"], _saved_keys(directory))
    loaded = dist_checkpointing.load(template, str(directory))
    missing, unexpected = state.model.load_state_dict(loaded["model"], strict=False)
    wrong = [k for k in missing if k not in absent] + list(unexpected)
    if wrong:
        raise CheckpointError(f"{directory}: the model's parameters do not match the checkpoint: "
                              f"{wrong[:5]}")
    if state.has_optimizer:
        state.optimizer.load_state_dict(loaded["optimizer"])
        state.scheduler.load_state_dict(loaded["scheduler"])
    state.steps_done = int(loaded["steps_done"])
    return loaded["extra_state"]
