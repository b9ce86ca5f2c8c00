"""Saving and loading the policy as a Megatron dist checkpoint, reshardable to any TP/PP.

A checkpoint directory holds megatron's sharded tensors (model, and optionally the distributed
optimizer's state in its reshardable model-space format), the lr scheduler, the caller's extra
state (controller, data sampler...), and `or1_checkpoint.json`: the architecture and layout it
was saved with, checked on load so a wrong model is named, not loaded. Saves are atomic: the
files go to a temporary sibling directory that is renamed into place when every rank is done.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from or1_megatron.errors import CheckpointError

if TYPE_CHECKING:
    from or1_megatron.policy.worker import PolicyWorker

META_NAME = "or1_checkpoint.json"
FORMAT_VERSION = 1
# The distributed optimizer's canonical per-parameter format: loadable at any TP/PP/DP.
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _metadata(worker: "PolicyWorker") -> dict[str, Any]:
    p = worker.config.parallel
    return {
        "format_version": FORMAT_VERSION,
        "arch": worker.arch.to_dict(),
        "padded_vocab_size": worker.padded_vocab,
        "saved_with": {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                       "world_size": p.world_size, "dtype": worker.config.model.dtype},
        "steps_done": worker.steps_done,
    }


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the state tensors a checkpoint load fills in place.

    Before its first step torch's Adam has no state (not even `step`), and megatron's
    distributed optimizer cannot describe what it would load. A zero-gradient step creates it;
    every value it touches is overwritten by the load that follows.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _state_dict(worker: "PolicyWorker", with_optimizer: bool, is_loading: bool) -> dict[str, Any]:
    if with_optimizer and is_loading:
        _materialise_optimizer_state(worker.optimizer)
    model_sd = worker.unwrapped.sharded_state_dict(metadata=_SHARDING)
    state: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = worker.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_SHARDING
        )
        state["scheduler"] = worker.scheduler.state_dict()
    return state


def save_checkpoint(
    worker: "PolicyWorker", directory: str | Path, extra_state: dict[str, Any] | None = None,
    with_optimizer: bool = True,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = Path(directory)
    staging = final.with_name(final.name + ".saving")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    state = _state_dict(worker, with_optimizer, is_loading=False)
    state["extra_state"] = extra_state or {}
    state["steps_done"] = worker.steps_done
    dist_checkpointing.save(state, str(staging))
    torch.distributed.barrier()
    if rank == 0:
        meta = _metadata(worker) | {"with_optimizer": with_optimizer}
        (staging / META_NAME).write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    torch.distributed.barrier()
    return final


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an or1-megatron checkpoint (no {META_NAME})")
    return json.loads(path.read_text())


def check_compatible(worker: "PolicyWorker", directory: str | Path) -> dict[str, Any]:
    """Refuse, by field, a checkpoint of another architecture or vocabulary padding."""
    meta = read_metadata(directory)
    saved, ours = meta["arch"], worker.arch.to_dict()
    for key, value in ours.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"{directory}: saved with {key}={saved.get(key)!r}, but the policy has {key}={value!r}"
            )
    if meta["padded_vocab_size"] != worker.padded_vocab:
        raise CheckpointError(
            f"{directory}: vocabulary padded to {meta['padded_vocab_size']} rows, the policy pads to "
            f"{worker.padded_vocab} (set model.make_vocab_size_divisible_by to match)"
        )
    return meta


def load_checkpoint(
    worker: "PolicyWorker", directory: str | Path, with_optimizer: bool = True
) -> dict[str, Any]:
    """Collective: load weights (and optimizer/scheduler state) at this worker's layout.

    Returns the caller's extra state saved with the checkpoint.
    """
    meta = check_compatible(worker, directory)
    if with_optimizer and not meta.get("with_optimizer", False):
        raise CheckpointError(f"{directory}: saved without optimizer state; load with with_optimizer=False")
    template = _state_dict(worker, with_optimizer, is_loading=True)
    template["extra_state"] = None
    template["steps_done"] = None
    loaded = dist_checkpointing.load(template, str(directory))
    worker.unwrapped.load_state_dict(loaded["model"])
    if with_optimizer:
        worker.optimizer.load_state_dict(loaded["optimizer"])
        worker.scheduler.load_state_dict(loaded["scheduler"])
    worker.steps_done = int(loaded["steps_done"])
    return loaded["extra_state"]
