"""Reward options: OR1's rules for truncated responses, verifier timeouts, code test limits.

Owns only the option types and their defaults (the paper's rules); it runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from or1_megatron.rewards.sandbox import SandboxConfig


@dataclass
class RewardConfig:
    # The paper's rule: a truncated response (finish_reason "length", or no `</think>`) scores 0.
    # False keeps the released code's behaviour: without `</think>` the whole text is scored.
    truncated_scores_zero: bool = True
    math_timeout_s: int = 5  # math-verify parsing and verification timeout, each
    code_test_timeout_s: float = 6.0  # per test case (OR1's released code uses 6 s)
    code_total_timeout_s: float = 60.0  # all tests of one response together
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
