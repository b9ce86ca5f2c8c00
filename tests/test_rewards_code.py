"""Code reward against real LeetCodeDataset / rllm LeetCode / LiveCodeBench rows, in the sandbox."""
import json
import re

import pytest

from or1_megatron.data.loaders import load_problems
from or1_megatron.rewards import (
    GroundTruthError, RewardConfig, RewardPool, code_score, compute_score, extract_code,
    parse_code_tests,
)
from or1_megatron.rewards.code_reward import outputs_match

# The slowest reference needs over 13 s for a single assert on these shared 2-core machines:
# OR1's 6 s per test assumes faster cores.
SLOWEST_REFERENCE = "find-the-number-of-subsequences-with-equal-gcd"
GENEROUS = RewardConfig(code_test_timeout_s=60.0, code_total_timeout_s=400.0)

# Appended to a reference solution: the entry point returns a wrong value of the same kind.
BREAK_ENTRY_POINT = """

def _or1_wrong(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "#"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    if value is None:
        return "broken"
    return None

_or1_original = Solution.{method}
Solution.{method} = lambda self, *a, **k: _or1_wrong(_or1_original(self, *a, **k))
"""


def _response(code: str) -> str:
    return f"<think>\nI will write the solution.\n</think>\nHere it is:\n```python\n{code}\n```\n"


def _broken(record) -> str:
    method = record.ground_truth["entry_point"].split(".")[-1]
    return record.extra_info["reference_solution"] + BREAK_ENTRY_POINT.format(method=method)


def test_leetcodedataset_references_pass_and_broken_variants_fail(shared_data):
    records = load_problems(shared_data / "code" / "leetcodedataset_v0.3.1_test_part1.jsonl.gz")
    assert len(records) == 128
    # The slowest reference (about 2 minutes of asserts here) goes first, so the other worker
    # scores everything else meanwhile.
    records.sort(key=lambda r: r.uid != SLOWEST_REFERENCE)
    tasks = [dict(solution_str=_response(r.extra_info["reference_solution"]), **r.reward_kwargs())
             for r in records]
    tasks += [dict(solution_str=_response(_broken(r)), **r.reward_kwargs()) for r in records]
    with RewardPool(num_workers=2, config=GENEROUS) as pool:
        scores = pool.map(tasks)
        assert pool.errors == []
    failed = [r.uid for r, s in zip(records, scores[:128]) if s != 1.0]
    passed_broken = [r.uid for r, s in zip(records, scores[128:]) if s != 0.0]
    assert failed == [] and passed_broken == []


def test_rllm_leetcode_references_pass(shared_data):
    records = load_problems(shared_data / "code" / "leetcode_functional.json")[:12]
    tasks = [dict(solution_str=_response(r.extra_info["reference_solution"]), **r.reward_kwargs())
             for r in records]
    with RewardPool(num_workers=2, config=GENEROUS) as pool:
        assert pool.map(tasks) == [1.0] * len(tasks), pool.errors


SECOND_LARGEST = """
n = int(input())
a = list(map(int, input().split()))
print(a.index(sorted(a)[-2]) + 1)
"""


def test_livecodebench_stdin_row(shared_data):
    record = load_problems(shared_data / "code" / "livecodebench_public_part1.json")[0]
    assert "second largest" in record.question and "fn_name" not in record.ground_truth
    assert compute_score(solution_str=_response(SECOND_LARGEST), **record.reward_kwargs()) == 1.0
    off_by_one = SECOND_LARGEST.replace("+ 1)", ")")
    assert compute_score(solution_str=_response(off_by_one), **record.reward_kwargs()) == 0.0


def test_livecodebench_functional_row_with_class_and_bare_function(shared_data):
    lcb = load_problems(shared_data / "code" / "livecodebench_public_part1.json")
    record = next(r for r in lcb if r.ground_truth.get("fn_name") == "shortestDistanceAfterQueries")
    leetcode = load_problems(shared_data / "code" / "leetcodedataset_v0.3.1_test_part1.jsonl.gz")
    reference = leetcode[0].extra_info["reference_solution"]
    assert "shortestDistanceAfterQueries" in reference
    assert compute_score(solution_str=_response(reference), **record.reward_kwargs()) == 1.0
    # OR1 also accepts a bare function named fn_name.
    bare = re.sub(r"^    ", "", reference.replace("class Solution:\n", ""), flags=re.MULTILINE)
    bare = bare.replace("self, ", "")
    assert compute_score(solution_str=_response(bare), **record.reward_kwargs()) == 1.0
    wrong = reference.replace("return ans", "return ans[::-1] + [0]")
    assert compute_score(solution_str=_response(wrong), **record.reward_kwargs()) == 0.0


def test_or1_schemas_as_json_strings():
    assert code_score(_response("print(int(input()) * 2)"),
                      json.dumps({"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10\n"]})) == 1.0
    functional = {"inputs": [[1, 2], [5, 7]], "outputs": [[3], [12]], "fn_name": "add"}
    assert code_score(_response("def add(a, b):\n    return a + b"), functional) == 1.0
    assert code_score(_response("def add(a, b):\n    return a - b"), functional) == 0.0
    assert_case = {"assert_case": ["assert f(2) == 4", "assert f(3) == 9"]}
    assert code_score(_response("def f(x):\n    return x * x"), assert_case) == 1.0
    assert code_score(_response("def f(x):\n    return x + x"), assert_case) == 0.0


def test_unknown_schema_is_an_error_not_a_zero():
    with pytest.raises(GroundTruthError, match="matches no schema"):
        parse_code_tests({"cases": []})
    with pytest.raises(GroundTruthError, match="equal in length"):
        parse_code_tests({"inputs": ["1", "2"], "outputs": ["1"]})


def test_last_python_block_is_run_and_truncation_scores_zero():
    tests = {"inputs": ["1\n"], "outputs": ["2\n"]}
    two_blocks = ("<think>x</think>```python\nprint(0)\n```\nBetter:\n```python\n"
                  "print(int(input()) + 1)\n```")
    assert extract_code(two_blocks).strip() == "print(int(input()) + 1)"
    assert code_score(two_blocks, tests) == 1.0
    assert code_score(two_blocks, tests, {"finish_reason": "length"}) == 0.0
    assert code_score("<think>x</think> no code here", tests) == 0.0


@pytest.mark.parametrize("hack", [
    "import os\nos._exit(0)",  # exits "successfully" before the asserts run
    "import sys\nsys.exit(0)",
    "print('0' * 32 + ' {\"passed\": 1, \"total\": 1, \"detail\": \"\"}')",  # a forged verdict
])
def test_reward_hacks_score_zero(hack):
    ground_truth = {"import_prefix": "", "test_code": "def check(candidate):\n    assert candidate(1) == 2",
                    "entry_point": "f"}
    assert code_score(_response(hack + "\ndef f(x):\n    return 0"), ground_truth) == 0.0


RIGGED_EQ = """
class Always:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
"""


@pytest.mark.parametrize("ground_truth, solution", [
    # functional tests are compared outside the sandbox: a rigged __eq__ is just unserialisable
    ({"inputs": ["1"], "outputs": ["2"], "fn_name": "f"}, RIGGED_EQ + "def f(x):\n    return Always()"),
    # patching the harness's own functions after it bound them changes nothing
    ({"inputs": ["1"], "outputs": ["2"], "fn_name": "f"},
     "import __main__\n__main__._functional_tests = lambda s, n, o: []\ndef f(x):\n    return 0"),
    ({"assert_case": ["assert f(1) == 2"]},
     "import __main__\n__main__._probe_tests = lambda s, n, o: [lambda: None]\ndef f(x):\n    return 0"),
])
def test_tampering_with_the_harness_scores_zero(ground_truth, solution):
    assert code_score(_response(solution), ground_truth) == 0.0
    honest = solution.rsplit("def f(x):", 1)[0] + "def f(x):\n    return x + 1"
    if "Always" not in solution:  # the same tampering around a right answer still passes
        assert code_score(_response(honest), ground_truth) == 1.0


def test_output_comparison():
    assert outputs_match("1 2\n3  \n\n", "1 2\n3")
    assert outputs_match("0.3333333", "0.33333333")
    assert not outputs_match("1 2", "1 3")
    assert not outputs_match("", "1")


def test_functional_tests_whose_expected_output_is_a_plain_string():
    """APPS/TACO-style rows store a str return value as the plain string ("fl", ""), not as JSON
    text; LiveCodeBench stores JSON text ('"fl"'). Both compare as the value they are."""
    tests = {"inputs": [[["flower", "flow", "flight"]], [["dog", "racecar"]]],  # argument lists
             "outputs": ["fl", ""], "fn_name": "prefix"}
    right = ("def prefix(words):\n    import os\n    return os.path.commonprefix(words)")
    assert code_score(_response(right), tests) == 1.0
    wrong = "def prefix(words):\n    return words[0][:2]"
    assert code_score(_response(wrong), tests) == 0.0
    as_json = {**tests, "outputs": ['"fl"', '""']}  # the LiveCodeBench convention
    assert code_score(_response(right), as_json) == 1.0
    assert code_score(_response(wrong), as_json) == 0.0


LIST_CHECK = ("def check(candidate):\n"
              "    assert is_same_list(candidate(head = list_node([1, 2, 3])), list_node([3, 2, 1]))\n"
              "    assert is_same_list(candidate(head = list_node([])), list_node([]))\n")
REVERSE = ("class Solution:\n    def solve(self, head):\n        previous = None\n"
           "        while head:\n            head.next, previous, head = previous, head, head.next\n"
           "        return previous\n")
TREE_CHECK = ("def check(candidate):\n    assert is_same_tree(candidate(root = tree_node([4, 2, 7, 1, 3])), "
              "tree_node([4, 7, 2, None, None, 3, 1]))\n")
INVERT = ("class Solution:\n    def solve(self, root):\n        if root:\n"
          "            root.left, root.right = self.solve(root.right), self.solve(root.left)\n"
          "        return root\n")


@pytest.mark.parametrize("check, right, wrong", [
    (LIST_CHECK, REVERSE, REVERSE.replace("return previous", "return previous and previous.next")),
    (TREE_CHECK, INVERT, INVERT.replace("if root:", "if False:")),
], ids=["linked_list", "tree"])
def test_linked_list_and_tree_answers_are_judged_outside(shared_data, check, right, wrong):
    """LeetCodeDataset checks list and tree answers with its prelude's is_same_list/is_same_tree;
    the sandbox reports the returned ListNode/TreeNode as values and they are compared here."""
    import gzip

    with gzip.open(shared_data / "code" / "leetcodedataset_v0.3.1_test_part1.jsonl.gz", "rt") as f:
        prelude = json.loads(f.readline())["prompt"]
    tests = {"import_prefix": prelude, "entry_point": "Solution().solve", "test_code": check}
    assert code_score(_response(right), tests) == 1.0
    assert code_score(_response(wrong), tests) == 0.0
