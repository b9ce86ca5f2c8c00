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
  time instead of mapping and faulting the model in again. Only when the whole TP group is on
  one machine (same boot id); otherwise the shards travel point to point.
"""
from __future__ import annotations

import pickle
import socket
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state

from or1_megatron.convert.qwen2 import Qwen2Mapping
from or1_megatron.policy.hf_weights import stage_parameters
from or1_megatron.policy.parallel import RankLayout
from or1_megatron.rollout.serialization import use_file_system_sharing


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


def _machine() -> str:
    """This machine, across containers that share a kernel (and so /dev/shm) or not."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}:{boot_id.read_text().strip() if boot_id.exists() else ''}"


class PeerShards:
    """One per trainer rank: the TP group's shard exchange of a push, through shared memory."""

    def __init__(self) -> None:
        self._mapped: list[dict[str, torch.Tensor]] = []  # TP rank 0: the peers' parameters

    @staticmethod
    def usable(model: torch.nn.Module, layout: RankLayout) -> bool:
        """Collective over the stage's TP group: every rank on CPU, all on one machine."""
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        mine = (on_cpu, _machine())
        everyone: list = [None] * layout.tp_size
        torch.distributed.all_gather_object(everyone, mine,
                                            group=parallel_state.get_tensor_model_parallel_group())
        return all(cpu for cpu, _ in everyone) and len({machine for _, machine in everyone}) == 1

    def exchange(self, model: torch.nn.Module, mapping: Qwen2Mapping,
                 layout: RankLayout) -> dict[str, list[torch.Tensor]] | None:
        """Collective over the stage's TP group. On TP rank 0: each parameter's shards of TP
        ranks 1.. (mapped, not copied); None on the others. Every rank must call `done()`
        after TP rank 0 has read them."""
        group = parallel_state.get_tensor_model_parallel_group()
        params = stage_parameters(model, mapping, layout)
        mine = None
        if layout.tp_rank != 0:
            share_parameters(model)
            mine = bytes(ForkingPickler.dumps({name: p.detach() for name, p in params.items()}))
        gathered: list | None = [None] * layout.tp_size if layout.tp_rank == 0 else None
        torch.distributed.gather_object(mine, gathered, group_dst=0, group=group)
        if gathered is None:
            return None
        # Our own peers' pickles (not an engine's payload): plain unpickling maps their files.
        # The last push's mappings are let go only after these are built, so they are reused.
        self._mapped = [pickle.loads(payload) for payload in gathered[1:]]
        return {name: [peer[name] for peer in self._mapped] for name in params}

    @staticmethod
    def done() -> None:
        """Collective over the stage's TP group: TP rank 0 has read the peers' shards."""
        torch.distributed.barrier(group=parallel_state.get_tensor_model_parallel_group())
