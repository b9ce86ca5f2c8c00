"""Assert-style code tests judged outside the sandbox, where the solution cannot reach.

Owns the split of each test assert into what the solution must compute (a *probe*: an expression
evaluated inside the sandbox, e.g. `candidate(n=7)`) and what it is checked against (the
*expected* side, evaluated here from the test's literal text and never sent into the sandbox),
the encoding of probe values between the harness and this process, and the comparison.

Why: run next to the solution, an assert can be faked (a rigged `__eq__`, a replaced `exec`, a
forged verdict, the expected value read out of the harness's memory). Here the sandbox only
reports values; whatever it reports, it cannot know what they will be compared with.

Accepted statement shapes (everything in the data sets the loaders read; anything else is a
`GroundTruthError` naming the statement, so a row is skipped and counted, never judged inside):
- `assert <probe> <op> <expected>` or `assert <expected> <op> <probe>`, one comparison operator;
- `assert is_same_list(<probe>, list_node(<literal>))`, `assert is_same_tree(<probe>,
  tree_node(<literal>))` (LeetCodeDataset's linked-list and tree checks), either argument order;
- `assert <probe>` and `assert not <probe>` (truthiness);
- docstrings and `pass` in `check`'s body.
An expected side is a Python literal, `inf`/`nan` (the import prelude's names), `float('inf')`
and the like, or `list_node(...)`/`tree_node(...)` of a literal.
"""
from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from or1_megatron.errors import OR1Error


class GroundTruthError(OR1Error):
    """A code ground truth matches none of the supported schemas."""


@dataclass(frozen=True)
class LinkedList:
    """A linked list by its values, as `is_same_list` compares them."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Tree:
    """A binary tree by its LeetCode level order (None for a missing child, trailing Nones
    dropped): two trees are `is_same_tree` exactly when these are equal."""

    level_order: tuple[Any, ...]


_OPERATORS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne), ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le), ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
    ast.Is: ("is", operator.is_), ast.IsNot: ("is not", operator.is_not),
    ast.In: ("in", lambda a, b: a in b), ast.NotIn: ("not in", lambda a, b: a not in b),
}
_BY_SYMBOL = {symbol: fn for symbol, fn in _OPERATORS.values()}
_NAMED_FLOATS = {"inf": math.inf, "nan": math.nan}
_SAME_STRUCTURE = {"is_same_list": "list_node", "is_same_tree": "tree_node"}


@dataclass(frozen=True)
class AssertCheck:
    """One assert: `probe` is evaluated inside the sandbox, then `holds(value)` decides here."""

    probe: str
    op: str  # a comparison symbol of _OPERATORS, or "truthy" / "falsy"
    expected: Any = None
    probe_first: bool = True  # `probe op expected`, else `expected op probe`
    source: str = ""

    def holds(self, value: Any) -> bool:
        if self.op == "truthy":
            return bool(value)
        if self.op == "falsy":
            return not value
        left, right = (value, self.expected) if self.probe_first else (self.expected, value)
        if self.op in ("is", "is not"):
            # Identity is only meaningful for singletons once values crossed a process boundary.
            same = left == right and type(left) is type(right)
            return same if self.op == "is" else not same
        try:
            return bool(_BY_SYMBOL[self.op](left, right))
        except (TypeError, ValueError):  # e.g. `<` between a str and an int: the assert fails
            return False


class _NotTrusted(Exception):
    """The expression is not a value this process can compute from the test's text alone."""


def _tree_level_order(values: list[Any]) -> tuple[Any, ...]:
    """The level order of the tree LeetCodeDataset's `tree_node(values)` builds (a None value
    means no child there; children of absent nodes are not listed)."""
    if not values:
        return ()
    nodes: list[list[Any]] = [[values[0], None, None]]  # [value, left, right] as node indices
    queue, index = [0], 1
    while queue and index < len(values):
        parent = queue.pop(0)
        for side in (1, 2):
            if index < len(values) and values[index] is not None:
                nodes.append([values[index], None, None])
                nodes[parent][side] = len(nodes) - 1
                queue.append(len(nodes) - 1)
            index += 1
    order: list[Any] = []
    queue = [0]
    while queue:
        node = queue.pop(0)
        if node is None:
            order.append(None)
            continue
        order.append(nodes[node][0])
        queue.extend(nodes[node][1:])
    while order and order[-1] is None:
        order.pop()
    return tuple(order)


def _trusted_value(node: ast.expr) -> Any:
    """The value of an expected side, computed from its text; `_NotTrusted` when it needs code."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    if isinstance(node, ast.Name) and node.id in _NAMED_FLOATS:
        return _NAMED_FLOATS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _trusted_value(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 \
            and not node.keywords:
        name = node.func.id
        if name == "float":
            argument = _trusted_value(node.args[0])
            if isinstance(argument, (str, int, float)) and not isinstance(argument, bool):
                return float(argument)
        if name in ("list_node", "tree_node"):
            values = _trusted_value(node.args[0])
            if isinstance(values, list):
                if not values:
                    return None  # both helpers return None for an empty list
                return LinkedList(tuple(values)) if name == "list_node" else Tree(
                    _tree_level_order(values))
    raise _NotTrusted


def _is_trusted(node: ast.expr) -> bool:
    try:
        _trusted_value(node)
    except _NotTrusted:
        return False
    return True


def _comparison(probe: ast.expr, op: str, expected: ast.expr, probe_first: bool,
                source: str) -> AssertCheck:
    return AssertCheck(probe=ast.unparse(probe), op=op, expected=_trusted_value(expected),
                       probe_first=probe_first, source=source)


def _check_of(statement: ast.stmt, where: str) -> AssertCheck | None:
    """The check an assert statement makes; None for statements that test nothing."""
    source = ast.unparse(statement)
    if isinstance(statement, ast.Pass) or (isinstance(statement, ast.Expr)
                                           and isinstance(statement.value, ast.Constant)):
        return None
    if not isinstance(statement, ast.Assert):
        raise GroundTruthError(f"{where}: only assert statements can be judged outside the "
                               f"sandbox, got {source[:200]!r}")
    test = statement.test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _OPERATORS:
        op = _OPERATORS[type(test.ops[0])][0]
        left, right = test.left, test.comparators[0]
        left_trusted, right_trusted = _is_trusted(left), _is_trusted(right)
        if right_trusted and not left_trusted:
            return _comparison(left, op, right, True, source)
        if left_trusted and not right_trusted:
            return _comparison(right, op, left, False, source)
    elif isinstance(test, ast.Call) and isinstance(test.func, ast.Name) \
            and test.func.id in _SAME_STRUCTURE and len(test.args) == 2 and not test.keywords:
        builder = _SAME_STRUCTURE[test.func.id]
        for probe, expected in (test.args, reversed(test.args)):
            if isinstance(expected, ast.Call) and isinstance(expected.func, ast.Name) \
                    and expected.func.id == builder and _is_trusted(expected) \
                    and not _is_trusted(probe):
                return _comparison(probe, "==", expected, True, source)
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) \
            and not _is_trusted(test.operand):
        return AssertCheck(probe=ast.unparse(test.operand), op="falsy", source=source)
    elif not isinstance(test, ast.Compare) and not _is_trusted(test):
        return AssertCheck(probe=ast.unparse(test), op="truthy", source=source)
    raise GroundTruthError(
        f"{where}: cannot judge {source[:200]!r} outside the sandbox: an assert must compare "
        "the solution's value with a literal (e.g. `assert candidate(x) == [1, 2]`)")


def _checks(statements: list[ast.stmt], where: str) -> list[AssertCheck]:
    checks = [check for check in (_check_of(s, where) for s in statements) if check is not None]
    if not checks:
        raise GroundTruthError(f"{where}: no assert to judge")
    return checks


def _parse(source: str, where: str) -> ast.Module:
    try:
        return ast.parse(source)
    except SyntaxError as exc:
        raise GroundTruthError(f"{where} is not valid Python: {exc}") from exc


@dataclass(frozen=True)
class CheckFunctionTests:
    """A `def check(candidate): assert ...` test: `setup` is the test code's other top-level
    statements (helpers the probes may call), run inside before the probes."""

    setup: str
    candidate: str
    checks: list[AssertCheck]


def check_function_tests(test_code: str) -> CheckFunctionTests:
    """Split a `check(candidate)` test module into its setup, candidate name and checks."""
    tree = _parse(test_code, "test_code")
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise GroundTruthError("test_code defines no check(candidate)")
    candidate = check.args.args[0].arg if check.args.args else "candidate"
    setup = ast.unparse(ast.Module(body=[n for n in tree.body if n is not check], type_ignores=[]))
    return CheckFunctionTests(setup=setup, candidate=candidate,
                              checks=_checks(check.body, "test_code check()"))


def assert_case_checks(cases: list[str]) -> list[AssertCheck]:
    """The checks of an `assert_case` list (each entry one or more statements)."""
    checks: list[AssertCheck] = []
    for index, case in enumerate(cases):
        checks.extend(_checks(_parse(case, f"assert_case[{index}]").body, f"assert_case[{index}]"))
    return checks


def decode_value(text: str) -> Any:
    """A probe value as the harness encoded it (sandbox_harness._encode); ValueError when the
    text is not such an encoding. JSON objects are always tags: a dict is {"dict": pairs}."""
    try:
        return _decode(json.loads(text))
    except (TypeError, KeyError, RecursionError) as exc:
        raise ValueError(f"not an encoded value: {exc}") from exc


def _decode(data: Any) -> Any:
    if isinstance(data, list):
        return [_decode(item) for item in data]
    if not isinstance(data, dict):
        return data
    if len(data) != 1:
        raise ValueError("a tag object has exactly one key")
    (tag, payload), = data.items()
    if tag == "int" and isinstance(payload, str):
        return int(payload, 16)
    if tag == "bytes" and isinstance(payload, str):
        return bytes.fromhex(payload)
    if not isinstance(payload, list):
        raise ValueError(f"tag {tag!r} needs a list")
    items = [_decode(item) for item in payload]
    if tag == "tuple":
        return tuple(items)
    if tag == "set":
        return set(items)
    if tag == "dict":
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in items):
            raise ValueError("a dict is a list of [key, value] pairs")
        return {key: value for key, value in items}
    if tag == "list_node":
        return LinkedList(tuple(items))
    if tag == "tree_node":
        return Tree(tuple(items))
    raise ValueError(f"unknown tag {tag!r}")


def judge(checks: list[AssertCheck], encoded_values: list[str]) -> tuple[bool, str]:
    """(all checks hold, why not): one encoded probe value per check, in order."""
    if len(encoded_values) != len(checks):
        return False, f"{len(encoded_values)} values reported for {len(checks)} checks"
    for index, (check, text) in enumerate(zip(checks, encoded_values)):
        try:
            value = decode_value(text)
        except ValueError as exc:
            return False, f"check {index}: {exc}"
        if not check.holds(value):
            return False, f"check {index} fails: {check.source[:200]}"
    return True, ""
