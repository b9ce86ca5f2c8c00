"""Measured counterparts of the planner's figures.

The planner predicts what a layer keeps for backward from its shapes (`plan.memory`); this module
measures it on a real forward, on any device: the bytes of the distinct storages autograd saves,
parameters excluded, as they stand when the forward returns. Views of one buffer count once,
with the whole buffer (it stays alive as long as any view is saved); a buffer that selective
recompute frees after use (megatron resizes its storage to 0) counts nothing. Tests hold the
planner to it on CPU; `tools/bench_policy.py` prints both beside the GPU's peak memory.

It also measures the matmul peak that MFU and roofline figures are divided by
(`matmul_tflops`), on the device and in the dtype at hand, so a ratio a benchmark prints is
against a number measured in the same run, and reads the CPU's memory high-water mark.
"""
from __future__ import annotations

import statistics
import time
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up, synchronising CUDA."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> float:
    """Throughput of a square ``size``-sized matmul (8192 on CUDA, 1024 elsewhere), TFLOP/s."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b), device, repeats) / 1e12


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``: the CPU's memory measures)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (VmHWM) to its current resident set."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
