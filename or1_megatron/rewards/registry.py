"""verl-compatible reward entry point and the registry of reward functions by ability.

Owns dispatch (extra_info["ability"], else the data source name) and the process-wide reward
config; the grading itself lives in math_reward.py and code_reward.py.
"""
from __future__ import annotations

from typing import Any, Callable

from or1_megatron.errors import OR1Error
from or1_megatron.rewards.abilities import ability_of
from or1_megatron.rewards.code_reward import code_score
from or1_megatron.rewards.config import RewardConfig
from or1_megatron.rewards.math_reward import math_score
from or1_megatron.rewards.released import released_score

# verl's signature: (data_source, solution_str, ground_truth, extra_info) -> float
RewardFn = Callable[[str, str, Any, "dict[str, Any] | None"], float]

_config = RewardConfig()
_registry: dict[str, RewardFn] = {}


class UnknownAbilityError(OR1Error):
    """No reward function is registered for a row's ability."""


def set_reward_config(config: RewardConfig) -> None:
    """Set the config the built-in rewards use in this process (each pool worker sets its own)."""
    global _config
    _config = config


def get_reward_config() -> RewardConfig:
    return _config


def register_reward(ability: str, fn: RewardFn | None = None):
    """Register `fn` for `ability` (replacing any earlier one); usable as a decorator."""
    def add(f: RewardFn) -> RewardFn:
        _registry[ability] = f
        return f
    return add(fn) if fn is not None else add


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: dict[str, Any] | None = None) -> float:
    """Score one response, verl-style; dispatches through the registry (or, in the released
    scorer's mode, by the ground truth's content: rewards/released.py)."""
    if _config.compat == "released":
        return released_score(solution_str, ground_truth, _config)
    ability = ability_of(data_source, extra_info)
    fn = _registry.get(ability)
    if fn is None:
        raise UnknownAbilityError(
            f"no reward registered for ability {ability!r} (data source {data_source!r}); "
            f"registered: {sorted(_registry)}")
    return float(fn(data_source, solution_str, ground_truth, extra_info))


@register_reward("math")
def _math(data_source: str, solution_str: str, ground_truth: Any,
          extra_info: dict[str, Any] | None) -> float:
    return math_score(solution_str, ground_truth, extra_info, _config)


@register_reward("code")
def _code(data_source: str, solution_str: str, ground_truth: Any,
          extra_info: dict[str, Any] | None) -> float:
    return code_score(solution_str, ground_truth, extra_info, _config)
