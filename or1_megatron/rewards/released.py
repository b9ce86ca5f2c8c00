"""The reward exactly as Skywork-OR1's released code trains with it (`rewards.math.compat:
released`), written from its described rules, for reproductions and to measure the difference.

Its rules, each unlike the default (`or1`) mode:
- no truncation rule: a response cut at the length limit is graded like any other;
- only the text between the first and the second `</think>` is graded (all of it when there is
  no `</think>`);
- math or code is decided by the ground truth's content (a code test schema is code), not by
  the data source or the row's ability;
- a math gold is `json.loads`-ed, falling back to the raw string, so a Python-list text
  "['10', '12']" reaches math-verify as it is (which reads it as the interval (10, 12));
- every `\\boxed{}` of the graded text goes to math-verify, which merges them.
A malformed ground truth scores 0 for its own sample only (the released scorer zeroes the
whole chunk it was graded in; reproducing that would make one bad row cost a batch).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from or1_megatron.rewards.code_reward import score_code_text
from or1_megatron.rewards.code_tests import CodeTests, GroundTruthError, parse_code_tests
from or1_megatron.rewards.config import RewardConfig
from or1_megatron.rewards.math_reward import verify_answer
from or1_megatron.rewards.response import THINK_CLOSE

logger = logging.getLogger(__name__)


def released_segment(solution_str: str) -> str:
    """The text between the first and the second `</think>` (the whole text without one)."""
    parts = solution_str.split(THINK_CLOSE)
    return parts[1] if len(parts) > 1 else solution_str


def released_code_tests(ground_truth: Any) -> CodeTests | None:
    """The ground truth's code tests when its content is a code test schema, else None."""
    if isinstance(ground_truth, dict) or (isinstance(ground_truth, str)
                                          and ground_truth.lstrip().startswith("{")):
        try:
            return parse_code_tests(ground_truth)
        except GroundTruthError:
            return None
    return None


def released_golds(ground_truth: Any) -> list[str]:
    """`json.loads` of a stored gold (a list: alternatives), else the raw text."""
    if isinstance(ground_truth, str):
        try:
            value = json.loads(ground_truth)
        except ValueError:
            return [ground_truth]
    else:
        value = ground_truth
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def released_score(solution_str: str, ground_truth: Any, config: RewardConfig) -> float:
    """The released scorer's reward for one response (verl's signature, less the routing keys)."""
    text = released_segment(solution_str)
    tests = released_code_tests(ground_truth)
    if tests is not None:
        return score_code_text(text, tests, config)
    try:
        golds = released_golds(ground_truth)
    except Exception:  # a gold that cannot be read scores its own sample 0
        logger.debug("unreadable gold %r", ground_truth, exc_info=True)
        return 0.0
    return verify_answer(text, golds, config)
