"""The rule for what crosses a process boundary from a rank: CPU tensors only.

A CUDA tensor pickled to a driver or parent initialises CUDA there (a forked parent can then
never fork ranks again), pins memory of the rank's device in another process, or fails outright
where the receiver has no GPU. Every rank launcher (forked ranks, the forked rank group, Ray
actors) checks a result with `require_cpu_tensors` before it leaves the rank.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


class DeviceTensorResult(TypeError):
    """A rank tried to return a tensor that does not live on the CPU."""


def require_cpu_tensors(value: Any, what: str) -> None:
    """Raise DeviceTensorResult naming the path of the first non-CPU tensor inside `value`
    (tensors, and tensors nested in lists, tuples, dicts and dataclasses)."""
    path = _first_device_tensor(value, what, depth=0)
    if path is not None:
        where, device = path
        raise DeviceTensorResult(f"{where} is a tensor on {device}: results that leave a rank "
                                 "must be CPU tensors (move them with .cpu() on the rank)")


def _first_device_tensor(value: Any, path: str, depth: int) -> tuple[str, torch.device] | None:
    if depth > 32:  # deeper structures are not results a rank returns
        return None
    if isinstance(value, torch.Tensor):
        return None if value.device.type == "cpu" else (path, value.device)
    if isinstance(value, dict):
        items = ((f"{path}[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        return None
    for where, item in items:
        found = _first_device_tensor(item, where, depth + 1)
        if found is not None:
            return found
    return None
