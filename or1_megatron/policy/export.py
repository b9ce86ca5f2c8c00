"""Streams this pipeline stage's parameters as full Hugging Face tensors (TP shards gathered).

The weight sync and the Megatron -> HF converter both consume this stream; it yields one
parameter at a time (the converter takes its HF tensors, the weight sync writes them straight
into its buckets), so a rank holds its own shards plus at most one gathered parameter. Only the
stage's TP rank 0 uses full tensors (it sends or writes them), so the shards travel to it alone,
point to point: on one node gloo's all_gather moves bytes several times slower than send/recv.
"""
from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state

from or1_megatron.convert.qwen2 import Qwen2Mapping, TensorMapping, check_names
from or1_megatron.policy.hf_weights import stage_parameters
from or1_megatron.policy.parallel import RankLayout


def _gather_tp(shard: torch.Tensor, layout: RankLayout) -> list[torch.Tensor] | None:
    """Every TP shard of a parameter on TP rank 0; None on the other TP ranks, which send theirs."""
    if layout.tp_size == 1:
        return [shard]
    group = parallel_state.get_tensor_model_parallel_group()
    shard = shard.contiguous()
    if layout.tp_rank != 0:
        torch.distributed.send(shard, group_dst=0, group=group)
        return None
    parts = [shard] + [torch.empty_like(shard) for _ in range(1, layout.tp_size)]
    receiving = [torch.distributed.irecv(parts[r], group_src=r, group=group)
                 for r in range(1, layout.tp_size)]
    for work in receiving:
        work.wait()
    return parts


class StageParameter:
    """One parameter of the stage as the HF tensors it maps to, on the stage's TP rank 0: their
    names, shapes and dtype, and the gathered shards they are made from (the weight sync's
    buckets write them in place, or pass the views a single shard makes by reference)."""

    def __init__(self, mapping: Qwen2Mapping, entry: TensorMapping, shards: list[torch.Tensor]):
        self.mapping, self.entry, self.shards = mapping, entry, shards

    @property
    def names(self) -> tuple[str, ...]:
        return self.entry.hf_names

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.entry.hf_shapes

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0].dtype

    def views(self) -> list[torch.Tensor] | None:
        return self.mapping.hf_views(self.entry, self.shards)

    def tensors(self) -> list[torch.Tensor]:
        return self.mapping.to_hf(self.entry, self.shards)

    def write_into(self, outs: list[torch.Tensor]) -> None:
        self.mapping.to_hf_into(self.entry, self.shards, outs)


@torch.no_grad()
def iter_stage_parameters(
    model: torch.nn.Module, mapping: Qwen2Mapping, layout: RankLayout,
    peer_shards: dict[str, list[torch.Tensor]] | None = None,
) -> Iterator[StageParameter]:
    """Yield every parameter this stage owns with its TP shards gathered, on the stage's TP rank 0.

    All TP ranks of the stage must iterate together: the others yield nothing, they send their
    shards to TP rank 0 as it asks for each parameter. Unless TP rank 0 has the other ranks'
    shards already (`peer_shards`, by name: mapped from their shared memory), then it iterates
    alone.
    """
    params = stage_parameters(model, mapping, layout)
    entries = mapping.stage_entries(layout.pp_rank, layout.pp_size)
    check_names(params, [m.mcore_name for m in entries],
                where=f"policy stage {layout.pp_rank} vs. the Qwen2 mapping", what="parameter")
    for m in entries:
        own = params[m.mcore_name].detach()
        shards = (_gather_tp(own, layout) if peer_shards is None
                  else [own, *peer_shards[m.mcore_name]])
        if shards is not None:
            yield StageParameter(mapping, m, shards)


def iter_stage_hf_tensors(
    model: torch.nn.Module, mapping: Qwen2Mapping, layout: RankLayout
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor this stage owns, on the stage's TP rank 0 (the
    same collective contract as `iter_stage_parameters`)."""
    for param in iter_stage_parameters(model, mapping, layout):
        yield from zip(param.names, param.tensors())
