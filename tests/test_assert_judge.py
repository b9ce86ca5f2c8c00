"""Assert-style tests judged outside the sandbox: the split of asserts into probes and expected
values, the value encoding across the sandbox boundary, and the verdicts, against Python's own
assert semantics and LeetCodeDataset's own list/tree helpers."""
import gzip
import json
import math
import random

import pytest

from or1_megatron.data.loaders import DataError, load_problems
from or1_megatron.rewards import GroundTruthError, parse_code_tests
from or1_megatron.rewards import sandbox_harness
from or1_megatron.rewards.assert_judge import (LinkedList, Tree, assert_case_checks,
                                               check_function_tests, decode_value, judge)


def _round_trip(value):
    return decode_value(json.dumps(sandbox_harness._encode(value)))


def test_accepted_shapes_split_into_probe_and_trusted_expected_value():
    split = check_function_tests(
        "import math\n"
        "def helper(n):\n    return list(range(n))\n"
        "def check(solve):\n"
        "    '''docstring'''\n"
        "    assert solve(n = 7, q = [[0, 5]]) == [2, 2, 2]\n"
        "    assert -1 == solve(helper(3))\n"
        "    assert solve(1) == inf, 'message'\n"
        "    assert solve(2) is None\n"
        "    assert solve(3) in (1, 2)\n"
        "    assert solve(4)\n"
        "    assert not solve(5)\n"
        "    assert is_same_list(solve(head = list_node([1, 2])), list_node([2, 1]))\n"
        "    assert is_same_tree(tree_node([1, None, 2]), solve(root = tree_node([1, 2])))\n")
    assert split.candidate == "solve"
    assert "def helper" in split.setup and "check" not in split.setup
    shapes = [(c.probe, c.op, c.expected, c.probe_first) for c in split.checks]
    assert shapes == [
        ("solve(n=7, q=[[0, 5]])", "==", [2, 2, 2], True),
        ("solve(helper(3))", "==", -1, False),
        ("solve(1)", "==", math.inf, True),
        ("solve(2)", "is", None, True),
        ("solve(3)", "in", (1, 2), True),
        ("solve(4)", "truthy", None, True),
        ("solve(5)", "falsy", None, True),
        ("solve(head=list_node([1, 2]))", "==", LinkedList((2, 1)), True),
        ("solve(root=tree_node([1, 2]))", "==", Tree((1, None, 2)), True),
    ]
    # The expected values are nowhere in what the sandbox receives.
    sent = split.setup + "".join(c.probe for c in split.checks)
    assert "[2, 2, 2]" not in sent and "-1" not in sent and "[2, 1]" not in sent


@pytest.mark.parametrize("statement, reason", [
    ("assert candidate(1) == helper(1)", "cannot judge"),  # the expected side needs code
    ("assert 0 < candidate(1) < 3", "cannot judge"),  # chained comparison
    ("for i in range(3):\n        assert candidate(i) == i", "only assert statements"),
    ("x = candidate(1)", "only assert statements"),
    ("assert 1 == 1", "cannot judge"),  # nothing about the solution
])
def test_asserts_that_cannot_be_judged_outside_are_ground_truth_errors(statement, reason):
    with pytest.raises(GroundTruthError, match=reason):
        parse_code_tests({"test_code": f"def check(candidate):\n    {statement}\n",
                          "entry_point": "f", "import_prefix": ""})
    with pytest.raises(GroundTruthError, match=r"assert_case\[1\]"):
        assert_case_checks(["assert f(1) == 2", statement.replace("candidate", "f")])


def test_a_row_with_an_unjudgeable_assert_is_named_by_the_loader(tmp_path):
    row = {"task_id": "t", "prompt": "", "entry_point": "Solution().f", "query": "q",
           "test": "def check(candidate):\n    assert candidate(1) == other(1)\n"}
    path = tmp_path / "leetcode.jsonl"
    path.write_text(json.dumps({**row, "task_id": "ok", "test": "def check(candidate):\n"
                                "    assert candidate(1) == 2\n"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"row 1.*cannot judge 'assert candidate\(1\) == other\(1\)'"):
        load_problems(path, fmt="leetcodedataset")
    assert [r.uid for r in load_problems(path, fmt="leetcodedataset", on_error="skip")] == ["ok"]


@pytest.mark.parametrize("value", [
    [1, [2, 3]], (1, (2,)), {"a": 1, 2: [3]}, {(1, 2): "t"}, {1, 2}, frozenset({3}), b"\x00x",
    1.5, -0.0, math.inf, None, True, False, "", "é\n", 1 << 20000, -(1 << 20000), [],
], ids=lambda value: type(value).__name__)
def test_encoded_values_decode_to_equal_values_of_the_same_type(value):
    decoded = _round_trip(value)
    assert decoded == value
    assert type(decoded) is type(value) or isinstance(value, frozenset)


def test_encoding_keeps_the_distinctions_python_equality_makes():
    assert _round_trip((1, 2)) != [1, 2]  # a tuple is not a list
    assert _round_trip({"1": 1}) != {1: 1}
    assert _round_trip(1) == 1.0 and _round_trip(True) == 1  # and keeps the equalities it makes
    assert math.isnan(_round_trip(math.nan))


@pytest.mark.parametrize("value", [object(), lambda: 0, iter([1]), [1, object()]])
def test_values_that_are_not_plain_data_cannot_be_reported(value):
    with pytest.raises(TypeError, match="cannot be reported"):
        sandbox_harness._encode(value)


def test_a_cyclic_value_cannot_be_reported():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="nested too deeply"):
        sandbox_harness._encode(cycle)


@pytest.fixture(scope="module")
def leetcode_prelude(shared_data) -> dict:
    """LeetCodeDataset's own ListNode/TreeNode helpers (list_node, tree_node, is_same_*): the
    oracle the trusted comparison must agree with."""
    path = shared_data / "code" / "leetcodedataset_v0.3.1_test_part1.jsonl.gz"
    with gzip.open(path, "rt") as f:
        prelude = json.loads(f.readline())["prompt"]
    namespace: dict = {}
    exec(prelude, namespace)
    return namespace


def _random_values(rng: random.Random) -> list:
    values = [rng.choice([None, None, rng.randint(-2, 2)]) for _ in range(rng.randint(0, 9))]
    if values and rng.random() < 0.8:
        values[0] = rng.randint(-2, 2)
    return values


def test_tree_and_list_comparison_agrees_with_leetcodedatasets_helpers(leetcode_prelude):
    """For random pairs, `is_same_tree(tree_node(a), tree_node(b))` (the data set's check, run
    here as an oracle) equals the judge's verdict on the harness's encoding of tree_node(a)."""
    ns = leetcode_prelude
    rng = random.Random(0)
    agreed = {True: 0, False: 0}
    for _ in range(2000):
        a = _random_values(rng)
        b = a if rng.random() < 0.3 else _random_values(rng)
        for builder, same in (("tree_node", "is_same_tree"), ("list_node", "is_same_list")):
            source = f"assert is_same_x(candidate(), {builder}({b!r}))".replace(
                "is_same_x", same)
            check = assert_case_checks([source.replace("candidate", "f")])[0]
            got = json.dumps(sandbox_harness._encode(ns[builder](a)))
            oracle = bool(ns[same](ns[builder](a), ns[builder](b)))
            assert judge([check], [got])[0] is oracle, (builder, a, b)
            agreed[oracle] += 1
    assert min(agreed.values()) > 500  # both outcomes were exercised


def test_judge_follows_python_assert_semantics():
    checks = assert_case_checks(["assert f(1) == (1, 2)", "assert f(2) < 3", "assert f(3) is None",
                                 "assert f(4) != 'x'"])

    def verdict(*values, checks=checks):
        return judge(checks, [json.dumps(sandbox_harness._encode(v)) for v in values])[0]

    assert verdict((1, 2), 2.5, None, "y")
    assert not verdict([1, 2], 2, None, "y")  # a list is not the tuple asserted
    assert not verdict((1, 2), "2", None, "y")  # '2' < 3 raises TypeError: the assert fails
    assert not verdict((1, 2), 2, 0, "y")  # 0 is not None
    assert not verdict((1, 2), 2, None, "x")
    assert not verdict(math.nan, checks=assert_case_checks(["assert f(5) == nan"]))  # as Python
    assert not judge(checks, ["[1, 2]"])[0]  # fewer values than checks
    assert not judge(checks[:1], ["{not json"])[0]
    assert not judge(checks[:1], ['{"unknown": []}'])[0]
