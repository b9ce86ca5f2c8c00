"""Process-group and model-parallel set-up for one trainer rank (gloo on CPU, NCCL on GPU).

The rank's compute device follows from its process group's backend, decided once here: NCCL
computes on this rank's GPU, gloo on the CPU, even on a machine with GPUs (the converter runs
its ranks that way). Everything the rank builds is built on `RankLayout.device`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel

from or1_megatron.config.schema import ParallelConfig
from or1_megatron.policy.cpu_compat import apply_cpu_patches


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device = torch.device("cpu")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_parallel(parallel: ParallelConfig, seed: int) -> RankLayout:
    """Join (or create) the default process group and build megatron's parallel groups.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment when the default
    group does not exist yet (NCCL where a GPU is visible, else gloo). Idempotent within a
    process for the same layout.
    """
    if torch.distributed.is_initialized():
        on_gpu = torch.distributed.get_backend() == "nccl"
    else:
        on_gpu = torch.cuda.is_available()
    if parallel.context_parallel > 1:
        raise RuntimeError(
            "parallel.context_parallel > 1 is not built yet: packed micro-batches are not split "
            "per context-parallel rank (and it needs transformer-engine attention, GPUs only); "
            "use context_parallel=1")
    if not on_gpu:
        apply_cpu_patches()
    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            timeout=timedelta(minutes=parallel.timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    if world != parallel.world_size:
        raise RuntimeError(
            f"parallel.world_size={parallel.world_size} but {world} processes joined the group"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            distributed_timeout_minutes=parallel.timeout_minutes,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def rank_device() -> torch.device:
    """Where this rank computes: its GPU under NCCL, the CPU under gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current_layout() -> RankLayout:
    return RankLayout(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=rank_device(),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups (the default group belongs to the caller)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
