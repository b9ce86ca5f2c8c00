"""Patches that let megatron-core 0.16 train on CPU with gloo; applied to ranks that compute on
the CPU.

megatron-core assumes a GPU in a handful of places. Each patch below fixes one of them, and
`apply_cpu_patches()` must run in every CPU rank before the model is built. A rank that
computes on a GPU (NCCL) never applies them, so GPU runs always execute megatron's own code; a
CPU rank on a machine with GPUs (the converter's) applies them like any CPU rank, so megatron's
`torch.cuda.current_device()` never sends its tensors to a GPU. This module must never change
numerics: it only redirects devices, RNG state and type strings.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps hard-coded `device="cuda"` (causal masks, schedules' token counters) to the CPU,
    makes `Tensor.cuda()` a no-op, and reports CPU float tensors under their CUDA type names
    for the optimizer's and grad-clip's `param.type() == 'torch.cuda.FloatTensor'` asserts."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _CpuRNGStatesTracker:
    """Stands in for megatron's CudaRNGStatesTracker: named CPU generator states that `fork()`
    swaps in and out, so model-parallel regions draw from their own stream as on GPUs."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    def fork(self, name: str = "model-parallel-rng"):
        tracker = self

        class _Fork:
            def __enter__(self_inner):
                if name not in tracker.states_:
                    raise RuntimeError(f"rng state {name} is not added")
                self_inner.original = torch.get_rng_state()
                torch.set_rng_state(tracker.states_[name])

            def __exit__(self_inner, *exc):
                tracker.states_[name] = torch.get_rng_state()
                torch.set_rng_state(self_inner.original)
                return False

        return _Fork()


def _patch_torch_adam_checkpoint_load() -> None:
    """Fix two faults of megatron's distributed optimizer around torch's AdamW (used when apex
    and TE are absent) when it loads a reshardable checkpoint:
    - the per-parameter `step` is not in the checkpoint's parameter state (megatron restores it
      from the param groups first), so copying the state raised KeyError 'step';
    - that restored `step` is ONE tensor shared by every parameter, and AdamW's foreach update
      increments it once per parameter, so the next step used a wildly wrong bias correction.
    Each parameter gets its own copy of the restored step."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_with_own_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state:
            state["step"] = state["step"].detach().clone()
            tensors = {**tensors, "step": tensors.get("step", state["step"])}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_with_own_step


def apply_cpu_patches() -> bool:
    """Apply every CPU patch once per process. Returns True if patches are in force."""
    global _APPLIED
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    # RNG: megatron's tracker and recompute save/restore CUDA generator state.
    mcore_random.CudaRNGStatesTracker = _CpuRNGStatesTracker
    mcore_random._CUDA_RNG_STATE_TRACKER = _CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # Devices: tensors created on torch.cuda.current_device() land on the CPU.
    torch.cuda.current_device = lambda: "cpu"
    # p2p (batch_p2p_sync) and variable sequence lengths synchronize the device.
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None

    _patch_torch_adam_checkpoint_load()

    # Hard-coded device="cuda", Tensor.cuda() and Tensor.type() strings.
    _CudaToCpuMode().__enter__()
    _APPLIED = True
    logger.info("megatron-core CPU patches applied (this rank computes on the CPU)")
    return True
