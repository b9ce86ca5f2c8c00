"""Trainer parameters in shared memory (CPU): engines and TP rank 0 read them where they are.

With `sync.share_parameters` on CPU, each sending rank moves its parameters' storages into
/dev/shm once (the trainer keeps using them there) and then:
- at TP1 a colocated engine reads views of the parameters instead of a bucket copy
  (`share_parameters` returns the test for such a view);
- at TP > 1 the stage's TP rank 0 maps its peers' shards instead of receiving them over gloo,
  whose point-to-point copies go through the loopback at ~1.5 GB/s (`PeerShards`). Every push,
  each peer sends the file names of its stage's parameters (a few kB) and waits until TP rank 0
  is done reading them, so that no optimizer step writes a shard while it is read. TP rank 0
  keeps the last push's mappings, so torch's shared_cache hands the same storages back next
  time instead of mapping and faulting the model in again. Only where TP rank 0 can map a probe
  file of each peer (one machine, one /dev/shm); otherwise, and for any push whose hand-over
  fails (a full /dev/shm), the shards travel point to point, with a warning.
"""
from __future__ import annotations

import logging
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import torch
from megatron.core import parallel_state

from or1_megatron.convert.qwen2 import Qwen2Mapping
from or1_megatron.policy.hf_weights import stage_parameters
from or1_megatron.policy.parallel import RankLayout
from or1_megatron.rollout.serialization import (drop_pickled_references, pickled_storages,
                                                 use_file_system_sharing)

log = logging.getLogger(__name__)


def share_parameters(model: torch.nn.Module) -> Callable[[torch.Tensor], bool] | None:
    """Move the CPU parameters' storages into shared memory (in place, once: the trainer keeps
    using them there) and return the test for "a view of a parameter", or None on GPUs.

    At TP1 most tensors of the export stream are views of parameters; a colocated engine can
    read those where they are, which saves copying the model into the bucket (on CPU that copy
    is half of a sync). Moved here, up front, because pickling would move a storage in place
    while the packing thread may be reading it. Tensors built by the export (TP gathers, split
    qkv) are still copied into the bucket: their storages are new on every sync."""
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.numel() > 0]
    if not params:
        return None
    use_file_system_sharing()
    for param in params:
        param.data.share_memory_()  # a no-op after the first sync
    storages = {p.untyped_storage().data_ptr() for p in params}
    return lambda t: t.device.type == "cpu" and t.untyped_storage().data_ptr() in storages


class PeerShardsUnavailable(Exception):
    """Raised on every rank of the TP group alike: this push gets the shards point to point."""


def _hand_to_rank0(make: Callable[[], dict[str, torch.Tensor]],
                   layout: RankLayout) -> list[dict[str, torch.Tensor]] | None:
    """Collective over the stage's TP group: every other TP rank pickles `make()` (tensors go as
    shared-memory file names) and TP rank 0 loads them all, mapping the files. Returns the
    loaded dicts on TP rank 0 (None elsewhere), or raises PeerShardsUnavailable on every rank
    if a peer could not share (a full /dev/shm) or TP rank 0 could not map (another /dev/shm).
    A pickle that TP rank 0 did not load has its references dropped by its sender, so a
    failure leaves nothing in /dev/shm."""
    group = parallel_state.get_tensor_model_parallel_group()
    payload: tuple[str, Any] | None = None
    pickled: list[Any] = []
    if layout.tp_rank != 0:
        try:
            use_file_system_sharing()
            tensors = make()
            payload = ("ok", bytes(ForkingPickler.dumps(tensors)))
            pickled = pickled_storages(tensors.values())
        except Exception as exc:  # reported to every rank below, not raised alone
            payload = ("error", f"TP rank {layout.tp_rank}: {type(exc).__name__}: {exc}")
    gathered: list | None = [None] * layout.tp_size if layout.tp_rank == 0 else None
    torch.distributed.gather_object(payload, gathered, group_dst=0, group=group)
    loaded: list[dict[str, torch.Tensor]] = []
    outcome: list = [None]  # TP rank 0's verdict: (error or None, n: it loaded TP ranks 1..n)
    if gathered is not None:
        error = next((text for kind, text in gathered[1:] if kind == "error"), None)
        for rank, (_, data) in enumerate(gathered[1:] if error is None else [], start=1):
            try:  # our own TP peers' pickles (not an engine's payload)
                loaded.append(pickle.loads(data))
            except Exception as exc:
                error = f"TP rank 0 cannot map TP rank {rank}'s shared memory: {exc}"
                break
        outcome[0] = (error, len(loaded))
    torch.distributed.broadcast_object_list(outcome, group_src=0, group=group)
    error, loaded_peers = outcome[0]
    if error is not None:
        if pickled and layout.tp_rank > loaded_peers:
            drop_pickled_references(pickled)
        raise PeerShardsUnavailable(error)
    return loaded if layout.tp_rank == 0 else None


class PeerShards:
    """One per trainer rank: the TP group's shard hand-over of a push, through shared memory."""

    def __init__(self) -> None:
        self._mapped: list[dict[str, torch.Tensor]] = []  # TP rank 0: the peers' parameters

    @staticmethod
    def usable(model: torch.nn.Module, layout: RankLayout) -> bool:
        """Collective over the stage's TP group: every rank on CPU, and TP rank 0 can map a
        shared-memory probe from each peer (one machine, one /dev/shm)."""
        group = parallel_state.get_tensor_model_parallel_group()
        everyone: list = [None] * layout.tp_size
        torch.distributed.all_gather_object(
            everyone, all(p.device.type == "cpu" for p in model.parameters()), group=group)
        if not all(everyone):
            return False
        try:
            _hand_to_rank0(lambda: {"probe": torch.zeros(1, device="cpu").share_memory_()}, layout)
        except PeerShardsUnavailable as exc:
            log.warning("TP shards travel point to point: %s", str(exc))
            return False
        return True

    def exchange(self, model: torch.nn.Module, mapping: Qwen2Mapping,
                 layout: RankLayout) -> dict[str, list[torch.Tensor]] | None:
        """Collective over the stage's TP group. On TP rank 0: each parameter's shards of TP
        ranks 1.. (mapped, not copied); None on the others. Once it returns, every rank must
        call `done()` after TP rank 0 has read them; it raises PeerShardsUnavailable on every
        rank alike."""
        params = stage_parameters(model, mapping, layout)

        def shared_params() -> dict[str, torch.Tensor]:
            share_parameters(model)
            return {name: p.detach() for name, p in params.items()}

        loaded = _hand_to_rank0(shared_params, layout)
        if loaded is None:
            return None
        # The last push's mappings are let go only now, after these were built from the same
        # files: torch's shared_cache handed their storages back without mapping them again.
        self._mapped = loaded
        return {name: [peer[name] for peer in loaded] for name in params}

    @staticmethod
    def done() -> None:
        """Collective over the stage's TP group: TP rank 0 has read the peers' shards."""
        torch.distributed.barrier(group=parallel_state.get_tensor_model_parallel_group())
