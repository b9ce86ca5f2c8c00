"""Fixes for megatron-core defects that break this project's GPU path without transformer-engine.

Unlike `cpu_compat` (which adapts CUDA-only code to CPUs), these apply on every device and are
idempotent; `build_policy_model` applies them before building a model.

- megatron-core 0.16.1's `CheckpointWithoutOutput(fp8=False)` sets ``self.fp8 = fp8 is not
  None`` (True), then asks transformer-engine's FP8 state manager, which is not imported without
  TE: selective recompute of the norms raises NameError on the local spec (CPU or GPU). Without
  TE there is no FP8, so the flag is cleared.
"""
from __future__ import annotations

import functools

_APPLIED = {"done": False}


def apply_megatron_fixes() -> None:
    if _APPLIED["done"]:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    if not mcore_random.HAVE_TE:
        original_init = mcore_random.CheckpointWithoutOutput.__init__

        @functools.wraps(original_init)
        def init_without_fp8(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.fp8 = False

        mcore_random.CheckpointWithoutOutput.__init__ = init_without_fp8
    _APPLIED["done"] = True
