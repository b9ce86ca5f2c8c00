"""Code ground truth: parse Skywork-OR1-RL-Data's test schemas into one typed `CodeTests`.

Owns the schemas (stdin/stdout, functional `fn_name`, assert-based `check(candidate)` with an
import prelude, `assert_case` lists) and their validation; it runs nothing. Assert-based tests are
split into probes and trusted expected values here, once per row (assert_judge.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from or1_megatron.rewards.assert_judge import (AssertCheck, GroundTruthError, assert_case_checks,
                                               check_function_tests)

# The import prelude OR1 puts before `assert_case` tests (and LeetCode-style solutions).
DEFAULT_IMPORT_PREFIX = """from typing import *
from functools import *
from collections import *
from itertools import *
from heapq import *
from bisect import *
from string import *
from operator import *
from math import *
import math
import datetime
inf = float('inf')
"""


@dataclass
class CodeTests:
    """One problem's tests. `kind` is "stdin", "functional", "assert" or "assert_case"."""

    kind: str
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    fn_name: str = ""
    import_prefix: str = ""
    test_code: str = ""
    entry_point: str = ""
    assert_case: list[str] = field(default_factory=list)
    # Assert-based kinds: what runs inside the sandbox (setup, then `candidate` bound to
    # entry_point, then each check's probe) and what is judged outside (the checks).
    setup: str = ""
    candidate: str = ""
    checks: list[AssertCheck] = field(default_factory=list)

    @property
    def count(self) -> int:
        if self.kind in ("stdin", "functional"):
            return len(self.inputs)
        return len(self.checks)


def _as_dict(ground_truth: Any) -> dict[str, Any]:
    if isinstance(ground_truth, (str, bytes)):
        try:
            ground_truth = json.loads(ground_truth)
        except ValueError as exc:
            raise GroundTruthError(f"code ground truth is not valid JSON: {exc}") from exc
    if not isinstance(ground_truth, dict):
        raise GroundTruthError(f"code ground truth must be a dict, got {type(ground_truth).__name__}")
    # Parquet turns a missing schema field into None/empty; OR1's preprocessing drops empty keys too.
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in ground_truth.items()
            if v is not None and not (hasattr(v, "__len__") and len(v) == 0)}


def parse_code_tests(ground_truth: Any) -> CodeTests:
    """Parse a code ground truth (dict or JSON string) into `CodeTests`; raise on unknown schemas."""
    gt = _as_dict(ground_truth)
    if "import_prefix" in gt or "test_code" in gt:
        missing = [k for k in ("test_code", "entry_point") if k not in gt]
        if missing:
            raise GroundTruthError(f"assert-based ground truth lacks {missing}")
        split = check_function_tests(gt["test_code"])
        return CodeTests(kind="assert", import_prefix=gt.get("import_prefix", ""),
                         test_code=gt["test_code"], entry_point=gt["entry_point"],
                         setup=split.setup, candidate=split.candidate, checks=split.checks)
    if "assert_case" in gt:
        cases = gt["assert_case"]
        if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
            raise GroundTruthError("assert_case must be a list of assertion strings")
        return CodeTests(kind="assert_case", assert_case=cases, checks=assert_case_checks(cases),
                         import_prefix=gt.get("import_prefix", DEFAULT_IMPORT_PREFIX))
    if "inputs" in gt and "outputs" in gt:
        inputs, outputs = list(gt["inputs"]), list(gt["outputs"])
        if len(inputs) != len(outputs) or not inputs:
            raise GroundTruthError(
                f"inputs and outputs must be non-empty and equal in length ({len(inputs)} vs {len(outputs)})")
        if gt.get("fn_name"):
            return CodeTests(kind="functional", inputs=inputs, outputs=outputs, fn_name=gt["fn_name"],
                             import_prefix=gt.get("import_prefix", DEFAULT_IMPORT_PREFIX))
        return CodeTests(kind="stdin", inputs=inputs, outputs=outputs)
    raise GroundTruthError(
        f"code ground truth with keys {sorted(gt)} matches no schema: expected inputs/outputs "
        "[+fn_name], import_prefix/test_code/entry_point, or assert_case")
