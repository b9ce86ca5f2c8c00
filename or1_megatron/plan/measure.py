"""Measured counterparts of the planner's memory figures.

The planner predicts what a layer keeps for backward from its shapes (`plan.memory`); this module
measures it on a real forward, on any device: the bytes of the distinct storages autograd saves,
parameters excluded, as they stand when the forward returns. Views of one buffer count once,
with the whole buffer (it stays alive as long as any view is saved); a buffer that selective
recompute frees after use (megatron resizes its storage to 0) counts nothing. Tests hold the planner to it on CPU; `tools/bench_policy.py` prints
both beside the GPU's peak memory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_activation_bytes(
    fn: Callable[..., Any], *args: Any, exclude: Iterable[torch.Tensor] = (), **kwargs: Any
) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), bytes)``: what the call's autograd graph keeps for backward.

    Tensors sharing storage with ``exclude`` (the model's parameters) are not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, torch.UntypedStorage] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return result, sum(storage.nbytes() for storage in seen.values())
