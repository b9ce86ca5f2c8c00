"""Turn rows of the supported data sets into `ProblemRecord`s.

Owns the row schemas: verl (parquet or JSON; Skywork-OR1-RL-Data with `extra_info.model_difficulty`),
problem+answer math rows (NuminaMath/DeepScaleR/MATH-500 style), LeetCodeDataset (assert-based
`check(candidate)` tests), rllm's LeetCode (`tests.functional`) and LiveCodeBench (stdin or
functional tests). Code rows become OR1's ground-truth schemas (see rewards/code_tests.py).
A malformed row raises `DataError` naming file, row and field, or, with `on_error="skip"`, is
counted and logged.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from or1_megatron.data.readers import read_rows
from or1_megatron.data.records import DataError, ProblemRecord, SkipCounter
from or1_megatron.rewards.abilities import ability_of
from or1_megatron.rewards.code_tests import DEFAULT_IMPORT_PREFIX, GroundTruthError, parse_code_tests

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
STDIN_INSTRUCTION = ("Read the input from standard input and write the answer to standard output. "
                     "Enclose your final Python solution in a ```python code block.")
FUNCTIONAL_INSTRUCTION = ("Complete the starter code below and enclose your final Python solution in "
                          "a ```python code block.")


class RowError(ValueError):
    """A row-level problem; the loader adds the file and row number."""


def _field(row: dict[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(f"missing field {name!r} (row has {sorted(row)})")
    value = row[name]
    if not isinstance(value, kind):
        raise RowError(f"field {name!r} is a {type(value).__name__}, expected {kind}")
    return value


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _check_code_ground_truth(ground_truth: Any) -> None:
    try:
        parse_code_tests(ground_truth)
    except GroundTruthError as exc:
        raise RowError(f"reward_model.ground_truth: {exc}") from exc


# ---- row converters: (row, uid, data_source) -> ProblemRecord --------------------------------

def verl_row(row: dict[str, Any], uid: str, data_source: str | None) -> ProblemRecord:
    prompt = _field(row, "prompt", (list, tuple))
    if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        raise RowError("field 'prompt' must be a non-empty list of {role, content} messages")
    reward_model = _field(row, "reward_model", dict)
    if reward_model.get("ground_truth") in (None, ""):
        raise RowError("missing field 'reward_model.ground_truth'")
    source = data_source or _field(row, "data_source")
    extra_info = dict(row.get("extra_info") or {})
    ability = row.get("ability") or ability_of(source, extra_info)
    if ability == "code":
        _check_code_ground_truth(reward_model["ground_truth"])
    uid = str(extra_info.get("uid", uid))
    return ProblemRecord(uid=uid, data_source=source, ability=ability,
                         prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
                         ground_truth=reward_model["ground_truth"], extra_info=extra_info)


def math_row(row: dict[str, Any], uid: str, data_source: str | None) -> ProblemRecord:
    problem = _field(row, "problem")
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        raise RowError("missing field 'answer'")
    extra = {k: row[k] for k in ("difficulty", "year", "unique_id", "source") if k in row}
    return ProblemRecord(uid=uid, data_source=data_source or "math", ability="math",
                         prompt=_user(f"{problem} {MATH_INSTRUCTION}"), ground_truth=str(answer),
                         extra_info=extra)


def leetcodedataset_row(row: dict[str, Any], uid: str, data_source: str | None) -> ProblemRecord:
    ground_truth = {"import_prefix": _field(row, "prompt"), "test_code": _field(row, "test"),
                    "entry_point": _field(row, "entry_point")}
    _check_code_ground_truth(ground_truth)
    query = row.get("query") or (f"{_field(row, 'problem_description')}\n\n{FUNCTIONAL_INSTRUCTION}\n"
                                 f"```python\n{row.get('starter_code', '')}\n```")
    extra = {k: row[k] for k in ("task_id", "difficulty", "estimated_date") if k in row}
    if row.get("completion"):
        extra["reference_solution"] = row["completion"]
    return ProblemRecord(uid=str(row.get("task_id", uid)), data_source=data_source or "leetcode",
                         ability="code", prompt=_user(query), ground_truth=ground_truth,
                         extra_info=extra)


_CHECK_CALL = re.compile(r"^\s*check\((?P<entry>.+)\)\s*$")


def rllm_leetcode_row(row: dict[str, Any], uid: str, data_source: str | None) -> ProblemRecord:
    tests = _field(row, "tests", dict)
    code = tests.get("functional")
    if not isinstance(code, str):
        raise RowError("field 'tests.functional' must be the check(candidate) source")
    lines = code.rstrip().splitlines()
    match = _CHECK_CALL.match(lines[-1]) if lines else None
    if match is None:
        raise RowError("tests.functional does not end with check(<entry point>)")
    ground_truth = {"import_prefix": DEFAULT_IMPORT_PREFIX, "test_code": "\n".join(lines[:-1]),
                    "entry_point": match["entry"]}
    _check_code_ground_truth(ground_truth)
    extra: dict[str, Any] = {}
    if isinstance(row.get("solutions"), str):
        extra["reference_solution"] = row["solutions"]
    return ProblemRecord(uid=uid, data_source=data_source or "leetcode", ability="code",
                         prompt=_user(_field(row, "problem")), ground_truth=ground_truth,
                         extra_info=extra)


_METHOD = re.compile(r"def\s+(\w+)\s*\(\s*self")
_FUNCTION = re.compile(r"^def\s+(\w+)\s*\(", re.MULTILINE)


def livecodebench_row(row: dict[str, Any], uid: str, data_source: str | None) -> ProblemRecord:
    tests = _field(row, "tests", (list, str))
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as exc:
            raise RowError(f"field 'tests' is not valid JSON: {exc}") from exc
    if not tests or not all(isinstance(t, dict) and {"input", "output"} <= t.keys() for t in tests):
        raise RowError("field 'tests' must be a non-empty list of {input, output, testtype}")
    kinds = {t.get("testtype", "stdin") for t in tests}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise RowError(f"tests mix or use unknown test types: {sorted(kinds)}")
    starter = row.get("starter_code") or ""
    ground_truth: dict[str, Any] = {"inputs": [t["input"] for t in tests],
                                    "outputs": [t["output"] for t in tests]}
    if kinds == {"functional"}:
        name = _METHOD.search(starter) or _FUNCTION.search(starter)
        if name is None:
            raise RowError("functional tests need a starter_code that names the function")
        ground_truth["fn_name"] = name.group(1)
        prompt = f"{_field(row, 'problem')}\n\n{FUNCTIONAL_INSTRUCTION}\n```python\n{starter}\n```"
    else:
        prompt = f"{_field(row, 'problem')}\n\n{STDIN_INSTRUCTION}"
    return ProblemRecord(uid=uid, data_source=data_source or "livecodebench", ability="code",
                         prompt=_user(prompt), ground_truth=ground_truth, extra_info={})


CONVERTERS: dict[str, Callable[[dict[str, Any], str, str | None], ProblemRecord]] = {
    "verl": verl_row,
    "math": math_row,
    "leetcodedataset": leetcodedataset_row,
    "rllm_leetcode": rllm_leetcode_row,
    "livecodebench": livecodebench_row,
}


def detect_format(row: dict[str, Any]) -> str | None:
    """The converter name for a row, judged by its keys; None when no schema matches."""
    keys = row.keys()
    if "reward_model" in keys and "prompt" in keys:
        return "verl"
    if {"entry_point", "test"} <= keys:
        return "leetcodedataset"
    if "tests" in keys:
        return "rllm_leetcode" if isinstance(row["tests"], dict) else "livecodebench"
    if {"problem", "answer"} <= keys:
        return "math"
    return None


def load_problems(path: str | Path, fmt: str = "auto", on_error: str = "raise",
                  data_source: str | None = None, skips: SkipCounter | None = None) -> list[ProblemRecord]:
    """Load one data file into problem records.

    fmt: "auto" (by the first row's keys) or one of CONVERTERS. on_error: "raise" (a `DataError`
    naming file and row) or "skip" (counted per reason and logged as a warning; `skips`, when
    given, receives the counts and every skipped row with its reason).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    skips = skips if skips is not None else SkipCounter(str(path))
    records: list[ProblemRecord] = []
    converter = CONVERTERS.get(fmt) if fmt != "auto" else None
    if fmt != "auto" and converter is None:
        raise DataError(str(path), None, f"unknown format {fmt!r}; expected auto or {sorted(CONVERTERS)}")
    for index, row in read_rows(path):
        skips.total += 1
        try:
            if isinstance(row, DataError):
                raise RowError(row.reason)
            if converter is None:
                name = detect_format(row)
                if name is None:
                    raise DataError(str(path), index, f"no known schema has the keys {sorted(row)}")
                converter = CONVERTERS[name]
            records.append(converter(row, f"{path.name}:{index}", data_source))
        except DataError:
            raise
        except (RowError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # A converter's own checks raise RowError; anything else a malformed value provoked
            # (a JSON string where a dict belongs, say) is reported the same way, with its type.
            reason = str(exc) if isinstance(exc, RowError) else f"{type(exc).__name__}: {exc}"
            if on_error == "raise":
                raise DataError(str(path), index, reason) from exc
            skips.skip(index, reason.split(" (row has")[0])
    skips.log()
    return records


def load_many(paths: list[str | Path], fmt: str = "auto", on_error: str = "raise") -> list[ProblemRecord]:
    """`load_problems` over several files, concatenated in order."""
    return [record for path in paths for record in load_problems(path, fmt, on_error)]
