"""Rewards: verl-compatible `compute_score` for math (Math-Verify) and code (sandboxed tests).

Modules: registry (dispatch, plug-in rewards), abilities (math or code?), math_reward,
code_reward, code_tests (ground-truth schemas), response (OR1's truncation rule), sandbox
(+ sandbox_harness, run inside it), pool. Names are imported lazily so that data loaders can use
the light modules without loading math-verify.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_score": "registry", "register_reward": "registry", "set_reward_config": "registry",
    "get_reward_config": "registry", "ability_of": "abilities", "math_score": "math_reward",
    "code_score": "code_reward", "extract_code": "code_reward", "CodeTests": "code_tests",
    "GroundTruthError": "code_tests", "parse_code_tests": "code_tests", "RewardConfig": "config",
    "RewardPool": "pool", "Sandbox": "sandbox", "SandboxConfig": "sandbox",
    "SandboxError": "sandbox",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
