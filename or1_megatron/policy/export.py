"""Streams this pipeline stage's parameters as full Hugging Face tensors (TP shards gathered).

The weight sync and the Megatron -> HF converter both consume this stream; it yields one HF
tensor at a time, so a rank holds its own shards plus at most one gathered parameter.
"""
from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state

from or1_megatron.convert.qwen2 import Qwen2Mapping, check_names
from or1_megatron.policy.hf_weights import stage_parameters
from or1_megatron.policy.parallel import RankLayout


def _gather_tp(shard: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    if tp_size == 1:
        return [shard]
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, shard, group=parallel_state.get_tensor_model_parallel_group())
    return parts


@torch.no_grad()
def iter_stage_hf_tensors(
    model: torch.nn.Module, mapping: Qwen2Mapping, layout: RankLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every tensor this stage owns, on every rank of its TP group.

    All TP ranks of the stage must iterate together (each parameter is an all-gather).
    """
    params = stage_parameters(model, mapping, layout)
    entries = mapping.stage_entries(layout.pp_rank, layout.pp_size)
    check_names(params, [m.mcore_name for m in entries],
                where=f"policy stage {layout.pp_rank} vs. the Qwen2 mapping", what="parameter")
    for m in entries:
        hf_tensors = mapping.to_hf(m, _gather_tp(params[m.mcore_name].detach(), layout.tp_size))
        yield from zip(m.hf_names, hf_tensors)
