"""The rank launchers' process rules (the GPU family of bugs, checked on CPU): results are CPU
tensors, the backend is the caller's explicit choice, and a parent that initialised CUDA spawns
its ranks instead of forking them."""
from __future__ import annotations

import pytest
import torch

from or1_megatron.distributed import fork_launcher
from or1_megatron.distributed.fork_launcher import LaunchError, RankFailed, run_forked
from or1_megatron.distributed.rank_group import RankGroup

# Set in the parent by a test: a forked rank inherits the change, a spawned one imports afresh.
PARENT_STATE = {"changed_in_parent": False}


def _returns_device_tensor(rank: int, world_size: int) -> dict:
    # The meta device stands in for a GPU here: any tensor not on the CPU must not leave.
    return {"logprob": [torch.zeros(3), torch.zeros(3, device="meta")]}


def _returns_cpu(rank: int, world_size: int) -> dict:
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    return {"rank": rank, "sum": total, "inherited": PARENT_STATE["changed_in_parent"]}


def test_a_rank_returning_a_non_cpu_tensor_fails_naming_the_path():
    with pytest.raises(RankFailed, match=r"rank 0's result\['logprob'\]\[1\] is a tensor on meta"):
        run_forked(_returns_device_tensor, 1, timeout_s=60)


def _setup(rank: int, world_size: int) -> int:
    return rank


def _device_result(state: int) -> torch.Tensor:
    return torch.ones(2, device="meta")


def _cpu_result(state: int) -> torch.Tensor:
    return torch.full((2,), float(state))


def test_a_rank_group_call_returning_a_non_cpu_tensor_fails():
    with RankGroup(2, _setup, timeout_s=60) as group:
        assert [t.tolist() for t in group.call(_cpu_result)] == [[0.0, 0.0], [1.0, 1.0]]
        with pytest.raises(RankFailed, match=r"_device_result is a tensor on meta"):
            group.call(_device_result)


def test_the_backend_is_explicit_and_checked():
    with pytest.raises(LaunchError, match="not one of gloo, nccl"):
        run_forked(_returns_cpu, 1, backend="mpi")
    if torch.cuda.device_count() < 2:
        with pytest.raises(LaunchError, match="one GPU per rank"):
            run_forked(_returns_cpu, 2, backend="nccl")


def test_ranks_are_forked_normally_and_spawned_after_cuda_initialised(monkeypatch):
    monkeypatch.setitem(PARENT_STATE, "changed_in_parent", True)
    forked = run_forked(_returns_cpu, 2, timeout_s=60)
    assert [r["inherited"] for r in forked] == [True, True]
    assert [float(r["sum"]) for r in forked] == [3.0, 3.0]
    # `import megatron.core` initialises CUDA on a GPU machine: forked ranks could not use it.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert fork_launcher.start_method() == "spawn"
    spawned = run_forked(_returns_cpu, 2, timeout_s=120)
    assert [r["inherited"] for r in spawned] == [False, False]
    assert [float(r["sum"]) for r in spawned] == [3.0, 3.0]


def test_spawned_ranks_need_a_picklable_function(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(LaunchError, match="picklable"):
        run_forked(lambda rank, world: rank, 1, timeout_s=60)


def test_gloo_binds_to_the_interface_of_the_nodes_address(monkeypatch):
    """A rank binds gloo to the interface holding its node's address (where the hostname resolves
    to loopback, gloo advertised 127.0.0.1 to other nodes: tests/test_two_nodes.py); a user's
    GLOO_SOCKET_IFNAME wins."""
    import os

    from or1_megatron.distributed.network import bind_gloo_to, interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("198.51.100.77") is None  # TEST-NET-2: on no interface here
    # unset (empty) through monkeypatch, so that what bind_gloo_to writes is undone after the
    # test: a leaked GLOO_SOCKET_IFNAME=lo reached the two-node jobs' ranks
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")
    assert bind_gloo_to("127.0.0.1") == "lo" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert bind_gloo_to("127.0.0.1") == "eth7"
