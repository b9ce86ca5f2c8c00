"""A check for the GPU-only family of bugs that can run on a CPU: tensors made without a device,
and collectives given tensors that do not live on their group's device.

On a CPU every tensor is on the one device, so a rank that builds a tensor with `torch.zeros(n)`
works here and fails on a GPU ("index is on cpu, different from other tensors on cuda:0"), and
a CPU tensor handed to an NCCL collective fails only there. Inside `DeviceDiscipline()`:
- every factory call (torch.zeros, torch.tensor, torch.arange, ...) made from or1_megatron's own
  code must say `device=` explicitly (a tensor meant for the host says device="cpu");
- every collective of torch.distributed must get tensors on its group's device (gloo: cpu,
  NCCL: cuda).
Violations are collected (file:line and the call), not raised, so a test sees all of them.
Megatron's and torch's own calls are not checked: only code this package owns (or the roots
given).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # .../or1_megatron
# Modules whose job is to act on devices for others (the CPU patches map device="cuda" to cpu).
EXEMPT = ("policy/cpu_compat.py", "distributed/device_discipline.py")

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace,
    torch.eye, torch.empty_strided, torch.scalar_tensor,
}
COLLECTIVES = ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce_scatter", "send", "recv", "isend", "irecv",
               "all_to_all_single", "gather", "scatter")


@dataclass(frozen=True)
class Violation:
    where: str  # path:line of the offending call
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _own_caller(depth: int, roots: tuple[str, ...]) -> str | None:
    """path:line of the frame `depth` levels up, if it is code under `roots` (not exempt)."""
    frame = sys._getframe(depth + 1)
    filename = frame.f_code.co_filename
    if not filename.startswith(roots) or filename.endswith(EXEMPT):
        return None
    return f"{filename}:{frame.f_lineno}"


class _FactoryCheck(TorchFunctionMode):
    def __init__(self, violations: list[Violation], roots: tuple[str, ...]):
        super().__init__()
        self.violations = violations
        self.roots = roots

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs and not _copies_a_tensor(func, args):
            where = _own_caller(1, self.roots)  # 1: the caller of the torch function
            if where is not None:
                self.violations.append(Violation(where, f"torch.{func.__name__} without device="))
        return func(*args, **kwargs)


def _copies_a_tensor(func: Any, args: tuple) -> bool:
    # torch.tensor(t) / torch.as_tensor(t) of a tensor keep its device.
    return func in (torch.tensor, torch.as_tensor) and bool(args) and isinstance(args[0], torch.Tensor)


def _group_device_type(group: Any) -> str:
    backend = dist.get_backend(group)
    return "cuda" if str(backend).lower() == "nccl" else "cpu"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _checked(name: str, original: Any, violations: list[Violation], roots: tuple[str, ...]) -> Any:
    def collective(*args: Any, **kwargs: Any) -> Any:
        where = _own_caller(1, roots)
        if where is not None:
            group = kwargs.get("group")
            expected = _group_device_type(group)
            for tensor in [*_tensors(args), *_tensors(list(kwargs.values()))]:
                if tensor.device.type != expected:
                    violations.append(Violation(
                        where, f"dist.{name} given a tensor on {tensor.device}; its group's "
                        f"backend ({dist.get_backend(group)}) needs {expected} tensors"))
        return original(*args, **kwargs)

    collective.__wrapped__ = original  # type: ignore[attr-defined]
    return collective


@contextlib.contextmanager
def DeviceDiscipline(roots: Sequence[str] = (PACKAGE_DIR,)) -> Iterator[list[Violation]]:
    """Collect the device violations of the code under `roots` (by default this package) run
    inside the block."""
    own = tuple(str(r) for r in roots)
    violations: list[Violation] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for name, original in originals.items():
        setattr(dist, name, _checked(name, original, violations, own))
    try:
        with _FactoryCheck(violations, own):
            yield violations
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
