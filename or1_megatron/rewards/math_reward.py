"""Math reward: Math-Verify on the text after `</think>` against the `\\boxed{}`-wrapped gold answer.

Owns the math grading rule of OR1 (released `hf_math_verify` reward, with the paper's truncation
rule). It never executes model output.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any

from math_verify import parse, verify

from or1_megatron.rewards.config import RewardConfig
from or1_megatron.rewards.response import graded_text

logger = logging.getLogger(__name__)


def gold_answers(ground_truth: Any) -> list[str]:
    """Accepted answers as strings: one answer, a list of them, or a JSON list of strings.

    A JSON-looking string whose items are not all strings (e.g. the interval `[0, 1]`) is one
    answer, not a list.
    """
    if hasattr(ground_truth, "tolist"):  # numpy arrays from parquet list columns
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, str):
        text = ground_truth.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if isinstance(items, list) and items and all(isinstance(i, str) for i in items):
                return items
        return [ground_truth]
    if isinstance(ground_truth, (list, tuple)):
        return [str(item) for item in ground_truth]
    return [str(ground_truth)]


def _timeout(config: RewardConfig) -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may install; elsewhere the
    # reward pool's per-task deadline is the bound.
    if threading.current_thread() is threading.main_thread():
        return config.math_timeout_s
    return None


def math_score(solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None,
               config: RewardConfig | None = None) -> float:
    """1.0 when the final answer after `</think>` verifies against any gold answer, else 0.0."""
    config = config or RewardConfig()
    text = graded_text(solution_str, extra_info, config.truncated_scores_zero)
    if text is None:
        return 0.0
    timeout = _timeout(config)
    try:
        predicted = parse(text, parsing_timeout=timeout)
    except Exception:  # math-verify raises on pathological LaTeX and on timeouts
        logger.debug("math-verify could not parse the response", exc_info=True)
        return 0.0
    if not predicted:
        return 0.0
    for gold in gold_answers(ground_truth):
        # Exact match of the extracted answer string first: also covers non-LaTeX answers.
        if len(predicted) > 1 and str(predicted[1]).strip() == gold.strip():
            return 1.0
        try:
            if verify(parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout), predicted,
                      timeout_seconds=timeout):
                return 1.0
        except Exception:
            logger.debug("math-verify failed on gold %r", gold, exc_info=True)
    return 0.0
