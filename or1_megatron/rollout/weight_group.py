"""A weight-update process group between a trainer (rank 0) and engine ranks, outside any default group.

SGLang's `init_weights_update_group` makes each engine rank join a fresh group with the trainer
at `rank_offset + tp_rank`; `update_weights_from_distributed` then receives one broadcast per
tensor from rank 0. Engines and trainers already have (or must not have) a default
torch.distributed group, so this builds a standalone group (gloo on CPU, NCCL between GPUs)
from a TCPStore, keyed exactly as SGLang's group is (`group_store`), so the same trainer side
reaches SGLang and the CPU engine. Both sides use this class: the CPU engine to receive, the
trainer (or a test) to send. It owns the group's lifetime only, never what is sent.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


# The device prefix torch's `_new_process_group_helper` gives each backend's store: the first
# device of its device map (gloo's is cpu and cuda, built once under cpu; NCCL's is cuda).
_STORE_DEVICE = {"gloo": "cpu", "nccl": "cuda"}


def group_store(store: dist.Store, group_name: str, backend: str = "gloo") -> dist.Store:
    """The store view a member of SGLang's weight-update group rendezvouses in.

    SGLang 0.5.21's `init_custom_process_group` wraps the tcp:// rendezvous store in
    `PrefixStore(group_name)`; torch's `_new_process_group_helper` (2.13) adds
    `PrefixStore(f"{group_name}/")` and, per device backend, `PrefixStore("<device>/")`.
    A member keyed otherwise waits for peers that never appear (SGLang's default timeout is
    30 min). tests/test_rollout_weight_group.py checks this against torch's own helper."""
    return dist.PrefixStore(f"{_STORE_DEVICE[backend]}/", dist.PrefixStore(
        f"{group_name}/", dist.PrefixStore(group_name, store)))


class WeightUpdateGroup:
    """A group of `world_size` ranks; rank 0 hosts the rendezvous store and sends.

    backend "gloo" moves CPU tensors; "nccl" moves tensors on this process's current GPU."""

    def __init__(self, master_address: str, master_port: int, *, rank: int, world_size: int,
                 group_name: str = "weight_update_group", timeout_s: float = 120.0,
                 backend: str = "gloo"):
        if backend not in _STORE_DEVICE:
            raise ValueError(f"weight-update group backend {backend!r}; one of {sorted(_STORE_DEVICE)}")
        nccl_here = torch.cuda.is_available() and hasattr(dist, "ProcessGroupNCCL")
        if backend == "nccl" and not nccl_here:  # checked before the store starts listening
            raise ValueError("an NCCL weight-update group needs a GPU and a CUDA build of torch")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        # As torch's tcp:// rendezvous makes it for SGLang: rank 0 serves, multi-tenant.
        self._store = dist.TCPStore(master_address, master_port, world_size,
                                    is_master=(rank == 0), timeout=timeout, multi_tenant=True)
        store = group_store(self._store, group_name, backend)
        if backend == "gloo":
            self.device = torch.device("cpu")
            self._group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            options.is_high_priority_stream = False
            self._group = dist.ProcessGroupNCCL(store, rank, world_size, options)

    def send(self, tensor: torch.Tensor) -> None:
        """Broadcast one tensor from rank 0 (call on rank 0)."""
        self._group.broadcast(tensor.detach().contiguous(), 0).wait()

    def receive(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Receive one broadcast tensor from rank 0."""
        tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self._group.broadcast(tensor, 0).wait()
        return tensor

    def close(self) -> None:
        if self.device.type == "cuda" and self._group is not None:
            self._group.shutdown()  # an NCCL communicator is not freed by dropping it
        self._group = None
        self._store = None
