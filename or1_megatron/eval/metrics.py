"""Evaluation arithmetic: avg@k, the unbiased pass@k, the paper's k per data source, the table.

Owns the numbers `or1 eval` reports, computed from per-problem correctness counts only; it never
samples or scores anything (sampling.py does). A sample is correct when its reward is >= 1.0, the
same rule the online filter's `SolveTracker` uses.

Default k per data source (the paper's evaluation, DESIGN 4): the lower-cased data source name is
matched against `DEFAULT_K_RULES` in order, first substring match wins: "aime" -> avg@32 (AIME24/25,
e.g. `test-math-aime24`), "livecodebench" -> avg@4; any other source gets `FALLBACK_K`. An explicit
`--k` replaces the rule for every source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

DEFAULT_K_RULES: tuple[tuple[str, int], ...] = (("aime", 32), ("livecodebench", 4))
# Sources the paper does not evaluate (MATH-500, LeetCode, ...): a few samples per problem
# give avg@k a usable variance at a quarter of AIME's cost.
FALLBACK_K = 4


def default_k(data_source: str) -> int:
    """The paper's number of samples for a data source (see the module docstring)."""
    name = data_source.lower()
    for pattern, k in DEFAULT_K_RULES:
        if pattern in name:
            return k
    return FALLBACK_K


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class ProblemCount:
    """Correctness of one problem's samples (what the metrics need of an outcome)."""

    data_source: str
    samples: int
    correct: int
    truncated: int = 0


def source_metrics(counts: Iterable[ProblemCount]) -> dict[str, dict[str, float | int]]:
    """Per data source: problems, k, avg@k, pass@k, truncated fraction, in first-seen order.

    k is the number of samples per problem of that source (the smallest, should problems differ);
    avg@k is the mean over problems of correct/samples and pass@k the mean of `pass_at_k`.
    """
    groups: dict[str, list[ProblemCount]] = {}
    for count in counts:
        groups.setdefault(count.data_source, []).append(count)
    metrics: dict[str, dict[str, float | int]] = {}
    for source, problems in groups.items():
        k = min(p.samples for p in problems)
        samples = sum(p.samples for p in problems)
        metrics[source] = {
            "problems": len(problems),
            "k": k,
            "avg@k": sum(p.correct / p.samples for p in problems) / len(problems),
            "pass@k": sum(pass_at_k(p.samples, p.correct, k) for p in problems) / len(problems),
            "truncated": sum(p.truncated for p in problems) / samples,
        }
    return metrics


def format_table(metrics: dict[str, dict[str, float | int]]) -> str:
    """The printed table: avg@k and pass@k in percent, as the paper reports them."""
    rows = [("data source", "problems", "avg@k", "pass@k", "truncated")]
    for source, m in metrics.items():
        k = m["k"]
        rows.append((source, str(m["problems"]), f"avg@{k} {100 * m['avg@k']:.2f}",
                     f"pass@{k} {100 * m['pass@k']:.2f}", f"{100 * m['truncated']:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)

