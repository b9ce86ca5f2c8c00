"""Code reward: run the last ```python block of a response against all tests; binary.

Owns code extraction, output comparison for stdin tests and the verdict rule (every test passes
-> 1.0). Execution is the sandbox's job (sandbox.py; sandbox_harness.py inside it); this module
never runs model code any other way.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

from or1_megatron.rewards.assert_judge import judge
from or1_megatron.rewards.code_tests import CodeTests, GroundTruthError, parse_code_tests
from or1_megatron.rewards.config import RewardConfig
from or1_megatron.rewards.response import graded_text
from or1_megatron.rewards.sandbox import Sandbox, check_sandbox

logger = logging.getLogger(__name__)

HARNESS_SOURCE = (Path(__file__).with_name("sandbox_harness.py")).read_text(encoding="utf-8")
_CODE_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)
# Margin for interpreter start-up on top of the per-test limits of a harness run.
_STARTUP_S = 5.0

_sandboxes: dict[str, Sandbox] = {}


def extract_code(text: str) -> str | None:
    """The last ```python fenced block of `text`, or None."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def sandbox_for(config: RewardConfig) -> Sandbox:
    """One checked sandbox per process and sandbox config (the check runs a probe program once)."""
    key = repr(config.sandbox)
    if key not in _sandboxes:
        sandbox = Sandbox(config.sandbox)
        check_sandbox(sandbox)
        _sandboxes[key] = sandbox
    return _sandboxes[key]


def outputs_match(got: str, want: Any) -> bool:
    """stdout comparison: lines with trailing blanks dropped, else token-wise, with a tolerance
    only where the expected token is not an integer. Lines and tokens are compared as they are
    read, never listed: 16 MiB of one-character lines must not cost the trainer gigabytes."""
    want = want if isinstance(want, str) else "\n".join(map(str, want)) if isinstance(want, list) else str(want)
    if got == want or all(g == w for g, w in itertools.zip_longest(_lines(got), _lines(want))):
        return True
    for g, w in itertools.zip_longest(_tokens(got), _tokens(want)):
        if g is None or w is None:
            return False
        if g == w:
            continue
        if _INTEGER.fullmatch(w):  # integers are exact: 1200000000 is not 1200000001
            return False
        try:
            if not math.isclose(float(g), float(w), rel_tol=1e-6, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` stripped of surrounding blank space, each right-stripped, lazily."""
    for match in re.finditer(r"[^\r\n]*(?:\r\n|\r|\n|$)", text.strip()):
        line = match.group()
        if not line:
            return
        yield line.rstrip()


def _tokens(text: str) -> Iterator[str]:
    return (match.group() for match in re.finditer(r"\S+", text))


_INTEGER = re.compile(r"[+-]?\d+")


def _same_value(got: Any, want: Any) -> bool:
    """Equality of JSON values (tuples arrive as lists), with a tolerance where the expected
    value is a float (an expected integer is exact: 1000000001.0 is not 1000000000)."""
    if isinstance(want, float):
        if isinstance(got, bool) or isinstance(want, bool):
            return got == want
        try:
            return math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same_value(g, w) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_value(got[k], want[k]) for k in got)
    return got == want


def expected_value(want: Any) -> Any:
    """An expected return value as stored. LiveCodeBench stores each as JSON text ('[3, 2]',
    '"abc"'); APPS/TACO-style rows (Skywork-OR1-RL-Data's code, parsed from JSON as a whole)
    store plain values, strings included ("fl", ""). A string is therefore JSON if it parses as
    JSON, else the plain string it is."""
    if not isinstance(want, str):
        return want
    try:
        return json.loads(want)
    except ValueError:
        return want


def _functional_outputs_match(got_json: list[str], expected: list[Any]) -> bool:
    """Return values reported by the sandbox (JSON text) against the expected outputs."""
    if len(got_json) != len(expected):
        return False
    for got_text, want in zip(got_json, expected):
        try:
            got = json.loads(got_text)
        except (TypeError, ValueError):
            return False
        want = expected_value(want)
        # APPS/TACO wrap a single return value in a list.
        if not (_same_value(got, want) or (isinstance(want, list) and len(want) == 1
                                           and _same_value(got, want[0]))):
            return False
    return True


def _run_stdin_tests(sandbox: Sandbox, code: str, tests: CodeTests, config: RewardConfig) -> bool:
    deadline = time.monotonic() + config.code_total_timeout_s
    for index, (case_input, case_output) in enumerate(zip(tests.inputs, tests.outputs)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        stdin = case_input if isinstance(case_input, str) else "\n".join(map(str, case_input))
        result = sandbox.run_python(code, stdin=stdin,
                                    time_limit_s=min(config.code_test_timeout_s, remaining))
        if not result.ok or not outputs_match(result.stdout, case_output):
            logger.debug("stdin test %d failed: rc=%s timed_out=%s", index, result.returncode,
                         result.timed_out)
            return False
    return True


def _harness_spec(code: str, tests: CodeTests, per_test_s: float) -> dict[str, Any]:
    """What the harness gets. Expected outputs and assert right-hand sides stay out: they are
    compared here."""
    spec: dict[str, Any] = {"solution": code, "prefix": tests.import_prefix, "per_test_s": per_test_s}
    if tests.kind == "functional":
        spec.update(mode="functional", fn_name=tests.fn_name, inputs=tests.inputs)
    else:
        spec.update(mode="probes", setup=tests.setup, candidate=tests.candidate,
                    entry_point=tests.entry_point, probes=[check.probe for check in tests.checks])
    return spec


def _run_harness_tests(sandbox: Sandbox, code: str, tests: CodeTests, config: RewardConfig) -> bool:
    secret = secrets.token_hex(16)
    spec = _harness_spec(code, tests, config.code_test_timeout_s)
    spec["secret"] = secret
    result = sandbox.run_python(HARNESS_SOURCE, stdin=json.dumps(spec),
                                time_limit_s=config.code_total_timeout_s + _STARTUP_S)
    for line in _lines(result.stdout):
        if line.startswith(secret + " "):
            verdict = read_verdict(line[len(secret) + 1:])
            if verdict is None:  # malformed: forged by the program, or cut off
                logger.debug("harness verdict is malformed: %r", line[:200])
                return False
            if verdict["detail"]:
                logger.debug("harness: %s", verdict["detail"])
            if not (verdict["total"] > 0 and verdict["passed"] == verdict["total"]):
                return False
            # The verdict only says every test ran; whether the values are right is decided here.
            if tests.kind == "functional":
                return _functional_outputs_match(verdict["outputs"], tests.outputs)
            passed, why = judge(tests.checks, verdict["outputs"])
            if not passed:
                logger.debug("assert tests: %s", why)
            return passed
    logger.debug("harness gave no verdict: rc=%s timed_out=%s stderr=%s", result.returncode,
                 result.timed_out, result.stderr[-500:])
    return False


def read_verdict(text: str) -> dict[str, Any] | None:
    """The harness's verdict {passed, total, detail, outputs}, or None unless it is exactly
    that shape (a program that reached the verdict channel may write anything there)."""
    try:
        verdict = json.loads(text)
    except ValueError:
        return None
    if not isinstance(verdict, dict) or set(verdict) != {"passed", "total", "detail", "outputs"}:
        return None
    counts = (verdict["passed"], verdict["total"])
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return None
    if not isinstance(verdict["detail"], str) or not isinstance(verdict["outputs"], list) \
            or not all(isinstance(o, str) for o in verdict["outputs"]):
        return None
    return verdict


def run_code_tests(code: str, tests: CodeTests, config: RewardConfig | None = None) -> bool:
    """True when `code` passes every test (stdin tests: one sandboxed run each)."""
    config = config or RewardConfig()
    sandbox = sandbox_for(config)
    if tests.kind == "stdin":
        return _run_stdin_tests(sandbox, code, tests, config)
    return _run_harness_tests(sandbox, code, tests, config)


def code_score(solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None,
               config: RewardConfig | None = None) -> float:
    """1.0 when the last ```python block after `</think>` passes all tests, else 0.0.

    A ground truth in no known schema raises `GroundTruthError`: a data bug, not a wrong answer.
    """
    config = config or RewardConfig()
    text = graded_text(solution_str, extra_info, config.truncated_scores_zero)
    if text is None:
        return 0.0
    return score_code_text(text, parse_code_tests(ground_truth), config)


def score_code_text(text: str, tests: CodeTests, config: RewardConfig) -> float:
    """1.0 when the last ```python block of `text` (the graded part) passes all `tests`."""
    code = extract_code(text)
    if code is None:
        return 0.0
    return 1.0 if run_code_tests(code, tests, config) else 0.0


__all__ = ["GroundTruthError", "code_score", "extract_code", "outputs_match", "run_code_tests",
           "score_code_text"]
