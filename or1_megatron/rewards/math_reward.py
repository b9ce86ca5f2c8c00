"""Math reward: Math-Verify on the last `\\boxed{}` after `</think>` against the gold answers.

Owns the math grading rule of OR1 (released `hf_math_verify` reward, with the paper's truncation
rule, golds read as stored in Skywork-OR1-RL-Data, and the last box graded). It never executes
model output.
"""
from __future__ import annotations

import ast
import json
import logging
import threading
from typing import Any

from math_verify import parse, verify

from or1_megatron.rewards.config import RewardConfig
from or1_megatron.rewards.response import graded_text

logger = logging.getLogger(__name__)


def gold_answers(ground_truth: Any) -> list[str]:
    """Accepted answers as strings: one answer, a list of alternatives, or the text of a list.

    Stored text is read as JSON, then as a Python literal (Skywork-OR1-RL-Data stores golds as
    the text of a Python list, "['10', '12']"; `ast.literal_eval`, never `eval`), then as plain
    text. A list of strings means alternatives, any of which scores 1; a list of numbers (the
    interval `[0, 1]`) is one answer.
    """
    if hasattr(ground_truth, "tolist"):  # numpy arrays from parquet list columns
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, str):
        items = _stored_list(ground_truth)
        return items if items is not None else [ground_truth]
    if isinstance(ground_truth, (list, tuple)):
        return [str(item) for item in ground_truth]
    return [str(ground_truth)]


def _stored_list(text: str) -> list[str] | None:
    """The alternatives of a stored list text, or None if the text is not a list of strings."""
    stripped = text.strip()
    if not stripped.startswith("["):
        return None
    for read in (json.loads, ast.literal_eval):
        try:
            items = read(stripped)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(items, list) and items and all(isinstance(i, str) for i in items):
            return items
        return None  # parsed, but not a list of strings: one answer
    return None


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`) of `text` with its braces balanced, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth = 0
    for end in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start:end + 1]
    return None  # unclosed: nothing complete to grade


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
    if config.math_boxed == "last":
        text = last_boxed(text) or text
    return verify_answer(text, gold_answers(ground_truth), config)


def verify_answer(text: str, golds: list[str], config: RewardConfig) -> float:
    """1.0 if math-verify finds in `text` an answer equal to one of `golds`, else 0.0."""
    timeout = _timeout(config)
    try:
        predicted = parse(text, parsing_timeout=timeout)
    except Exception:  # math-verify raises on pathological LaTeX and on timeouts
        logger.debug("math-verify could not parse the response", exc_info=True)
        return 0.0
    if not predicted:
        return 0.0
    for gold in golds:
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
