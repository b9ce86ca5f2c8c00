"""The part of a response that is graded, and OR1's rule for truncated responses.

Owns the single definition of "truncated" and "final answer text" shared by the math and code
rewards; it never grades anything itself.
"""
from __future__ import annotations

from typing import Any

THINK_CLOSE = "</think>"


def is_truncated(solution_str: str, extra_info: dict[str, Any] | None) -> bool:
    """Cut at the length limit (the engine's finish_reason), or the thinking never closed."""
    if extra_info and extra_info.get("finish_reason") == "length":
        return True
    return THINK_CLOSE not in solution_str


def graded_text(solution_str: str, extra_info: dict[str, Any] | None,
                truncated_scores_zero: bool) -> str | None:
    """The text after `</think>`, or None when the response must score 0 as truncated.

    With `truncated_scores_zero=False` (the released code's behaviour) a response without
    `</think>` is graded whole and a length-cut one is graded like any other.
    """
    if truncated_scores_zero and is_truncated(solution_str, extra_info):
        return None
    _, sep, after = solution_str.partition(THINK_CLOSE)
    return after if sep else solution_str
