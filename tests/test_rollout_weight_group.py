"""The trainer's weight-update group meets an engine that joins the way SGLang does.

The engine side is SGLang 0.5.21's `init_custom_process_group` when sglang is importable, else
the same calls to torch it makes (tcp:// rendezvous, `PrefixStore(group_name)`, torch's
`_new_process_group_helper`), then SGLang's receive (`torch.distributed.broadcast` from rank 0).
If torch or SGLang change how the group's store keys are built, this fails fast instead of a
sync waiting out SGLang's 30-minute timeout. The real SGLang server is the contract tests'
`sglang_cpu` tier (test_update_from_distributed_gloo_group).
"""
from __future__ import annotations

import datetime
import threading

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from or1_megatron.rollout.launcher import free_port
from or1_megatron.rollout.weight_group import WeightUpdateGroup

TIMEOUT = datetime.timedelta(seconds=30)


def _sglang_engine_group(port: int, rank: int, world_size: int, group_name: str,
                         backend: str = "gloo"):
    try:
        from sglang.srt.utils.common import init_custom_process_group
    except ImportError:
        from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                        _new_process_group_helper, _world,
                                                        rendezvous)

        store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", rank, world_size,
                                                  timeout=TIMEOUT))
        store.set_timeout(TIMEOUT)
        group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend),
                                             PrefixStore(group_name, store),
                                             group_name=group_name, backend_options=None,
                                             timeout=TIMEOUT, device_id=None)
        _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
        return group
    return init_custom_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                                     world_size=world_size, rank=rank, group_name=group_name,
                                     timeout=TIMEOUT)


def test_trainer_group_reaches_an_engine_joined_the_sglang_way():
    port, name = free_port(), "or1_test_weight_group"
    sent = [torch.arange(6, dtype=torch.float32).reshape(2, 3),
            torch.tensor([7, 8], dtype=torch.int64)]
    received: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def engine() -> None:  # engine rank 1 (rank_offset 1, tp_rank 0)
        try:
            group = _sglang_engine_group(port, 1, 2, name)
            tensors = [torch.empty_like(t) for t in sent]
            handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
            for handle in handles:
                handle.wait()
            received.extend(tensors)
            dist.destroy_process_group(group)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    trainer = WeightUpdateGroup("127.0.0.1", port, rank=0, world_size=2, group_name=name,
                                timeout_s=30)
    for tensor in sent:
        trainer.send(tensor)
    trainer.close()
    thread.join(timeout=30)
    assert errors == [] and len(received) == len(sent)
    assert all(torch.equal(a, b) for a, b in zip(received, sent, strict=True))


def test_a_backend_that_cannot_run_here_is_named():
    with pytest.raises(ValueError, match="backend 'mpi'"):
        WeightUpdateGroup("127.0.0.1", free_port(), rank=0, world_size=1, backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="NCCL weight-update group needs a GPU"):
            WeightUpdateGroup("127.0.0.1", free_port(), rank=0, world_size=1, backend="nccl")


def _nccl_engine(port: int, name: str, shapes: list, results) -> None:
    torch.cuda.set_device(1)
    group = _sglang_engine_group(port, 1, 2, name, backend="nccl")
    tensors = [torch.empty(shape, device="cuda") for shape in shapes]
    for tensor in tensors:
        dist.broadcast(tensor, src=0, group=group)
    results.put([t.cpu() for t in tensors])
    dist.destroy_process_group(group)


@pytest.mark.gpu
def test_nccl_group_reaches_an_engine_on_another_gpu():
    """The distributed transport between GPUs: the trainer on GPU 0, an engine rank that joined
    the SGLang way on GPU 1 (NCCL needs one GPU per rank)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("an NCCL weight-update group needs two GPUs")
    port, name = free_port(), "or1_test_nccl_group"
    sent = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.randn(4096)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    engine = ctx.Process(target=_nccl_engine, args=(port, name, [t.shape for t in sent], results))
    engine.start()
    torch.cuda.set_device(0)
    trainer = WeightUpdateGroup("127.0.0.1", port, rank=0, world_size=2, group_name=name,
                                timeout_s=60, backend="nccl")
    for tensor in sent:
        trainer.send(tensor.cuda())
    received = results.get(timeout=60)
    trainer.close()
    engine.join(timeout=60)
    assert all(torch.equal(a, b) for a, b in zip(received, sent, strict=True))
