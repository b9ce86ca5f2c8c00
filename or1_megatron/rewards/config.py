"""Reward options: OR1's rules for truncated responses, verifier timeouts, code test limits.

Owns only the option types and their defaults (the paper's rules); it runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from or1_megatron.config.schema import MATH_BOXED, REWARD_COMPAT
from or1_megatron.rewards.sandbox import SandboxConfig




@dataclass
class RewardConfig:
    # The paper's rule: a truncated response (finish_reason "length", or no `</think>`) scores 0.
    # False keeps the released code's behaviour: without `</think>` the whole text is scored.
    truncated_scores_zero: bool = True
    # last: grade the last \boxed{} of the final answer (a corrected answer counts); all: let
    # math-verify see every box (it merges them: \boxed{9} ... \boxed{8} becomes {8, 9}).
    math_boxed: str = "last"
    # or1: the paper's rules with the fixes above; released: the scorer Skywork-OR1's released
    # code trains with (rewards/released.py), for reproductions and to measure the difference.
    compat: str = "or1"
    math_timeout_s: int = 5  # math-verify parsing and verification timeout, each
    code_test_timeout_s: float = 6.0  # per test case (OR1's released code uses 6 s)
    code_total_timeout_s: float = 60.0  # all tests of one response together
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    @classmethod
    def from_run_config(cls, rewards: Any) -> "RewardConfig":
        """The reward options of a run config's `rewards` section."""
        return cls(truncated_scores_zero=rewards.truncated_scores_zero,
                   math_boxed=rewards.math.boxed, compat=rewards.math.compat)

    def __post_init__(self) -> None:
        if self.math_boxed not in MATH_BOXED:
            raise ValueError(f"math_boxed {self.math_boxed!r} is not one of {MATH_BOXED}")
        if self.compat not in REWARD_COMPAT:
            raise ValueError(f"compat {self.compat!r} is not one of {REWARD_COMPAT}")
