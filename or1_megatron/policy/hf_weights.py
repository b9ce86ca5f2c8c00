"""Loads Hugging Face safetensors weights into this rank's TP shard of its pipeline stage.

Every parameter of the stage must be filled exactly once and every tensor of the checkpoint must
be used by some stage; anything else is an error naming the tensors, never a silent skip.
"""
from __future__ import annotations

from typing import Callable

import torch

from or1_megatron.convert.qwen2 import Qwen2Mapping, canonical_mcore_name, check_names, layer_offset
from or1_megatron.convert.safetensors_io import SafetensorsReader
from or1_megatron.policy.parallel import RankLayout


def stage_parameters(model: torch.nn.Module, mapping: Qwen2Mapping, layout: RankLayout) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters keyed by the mapping's canonical (global-layer) names."""
    offset = layer_offset(mapping.arch.num_layers, layout.pp_rank, layout.pp_size)
    params = {canonical_mcore_name(name, offset): p for name, p in model.named_parameters()}
    if mapping.arch.tie_word_embeddings and not layout.is_first_stage:
        # With tied embeddings megatron gives the last stage its own copy of the embedding.
        params.pop("output_layer.weight", None)
    return params


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    hf_dir: str,
    mapping: Qwen2Mapping,
    layout: RankLayout,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Copy the HF checkpoint in `hf_dir` into `model` (this rank's shard), one tensor at a time.

    `on_tensor(nbytes)` is called after each HF tensor is read (progress reporting).
    Returns the number of mapped tensors filled.
    """
    reader = SafetensorsReader(hf_dir)
    check_names(reader.names(), mapping.hf_names(), where=f"{hf_dir}")
    params = stage_parameters(model, mapping, layout)
    entries = mapping.stage_entries(layout.pp_rank, layout.pp_size)
    check_names(params, [m.mcore_name for m in entries],
                where=f"policy stage {layout.pp_rank} vs. the Qwen2 mapping", what="parameter")
    for m in entries:
        hf_tensors = [reader.get(n) for n in m.hf_names]
        shard = mapping.to_mcore_shard(m, hf_tensors, layout.tp_rank, layout.tp_size)
        params[m.mcore_name].copy_(shard.to(params[m.mcore_name].dtype))
        if on_tensor is not None:
            for t in hf_tensors:
                on_tensor(t.numel() * t.element_size())
    if mapping.arch.tie_word_embeddings and layout.is_last_stage and not layout.is_first_stage:
        tied = mapping.get("embedding.word_embeddings.weight")
        shard = mapping.to_mcore_shard(tied, [reader.get(tied.hf_names[0])], layout.tp_rank, layout.tp_size)
        model.output_layer.weight.copy_(shard.to(model.output_layer.weight.dtype))
    return len(entries)
