"""Math reward on the real AIME24/25 answers and the real math-verify, with OR1's rules."""
import re
import threading

from or1_megatron.data.loaders import load_problems
from or1_megatron.rewards import RewardConfig, compute_score, math_score
from or1_megatron.rewards.math_reward import gold_answers


def _aime(shared_data):
    return (load_problems(shared_data / "eval" / "aime24.parquet")
            + load_problems(shared_data / "eval" / "aime25.parquet"))


def _as_model_writes(answer: str) -> str:
    # A model writes the plain number: no leading zeros, no degree sign.
    return str(int(re.match(r"\d+", answer).group()))


def _response(answer: str) -> str:
    return f"<think>\nLet me work this out carefully.\n</think>\nThe answer is \\boxed{{{answer}}}."


def test_aime_gold_answers_score_one_wrong_and_truncated_score_zero(shared_data):
    records = _aime(shared_data)
    assert len(records) == 60
    for record in records:
        answer = _as_model_writes(record.ground_truth)
        kwargs = record.reward_kwargs()
        assert compute_score(solution_str=_response(answer), **kwargs) == 1.0, record.ground_truth
        wrong = str(int(answer) + 1)
        assert compute_score(solution_str=_response(wrong), **kwargs) == 0.0, record.ground_truth
        cut = dict(kwargs, extra_info={**kwargs["extra_info"], "finish_reason": "length"})
        assert compute_score(solution_str=_response(answer), **cut) == 0.0
        no_close = f"<think>\nThe answer is \\boxed{{{answer}}} and I keep going"
        assert compute_score(solution_str=no_close, **kwargs) == 0.0


def test_leading_zeros_and_degrees_in_gold_verify_against_plain_numbers(shared_data):
    golds = {r.ground_truth for r in _aime(shared_data)}
    assert "336^\\circ" in golds  # the AIME25 answer the README warns about
    assert math_score(_response("336"), "336^\\circ") == 1.0
    assert math_score(_response("25"), "025") == 1.0
    assert math_score(_response("26"), "025") == 0.0


def test_only_text_after_think_is_graded():
    thinking_has_right_answer = "<think>\nMaybe \\boxed{25}?\n</think>\nSo the answer is \\boxed{24}."
    assert math_score(thinking_has_right_answer, "25") == 0.0


def test_released_code_rule_scores_responses_without_think_close():
    released = RewardConfig(truncated_scores_zero=False)
    assert math_score("The answer is \\boxed{25}.", "025", config=released) == 1.0
    assert math_score("The answer is \\boxed{25}.", "025") == 0.0


def test_list_and_json_list_ground_truths():
    assert gold_answers('["1/2", "0.5"]') == ["1/2", "0.5"]
    assert gold_answers("[0, 1]") == ["[0, 1]"]  # an interval is one answer
    assert math_score(_response("0.5"), ["\\frac{1}{2}", "x"]) == 1.0
    assert math_score(_response("\\frac{\\pi}{2}"), "\\frac{\\pi}{2}") == 1.0


def test_math500_latex_answers_verify_against_themselves(shared_data):
    """Every one of the 500 MATH-500 golds, written as the answer, scores 1, both through the
    reward and through math-verify's own equivalence (not the reward's exact-string shortcut)."""
    from math_verify import parse, verify

    records = load_problems(shared_data / "eval" / "math500.json")
    assert len(records) == 500
    failed = [r.ground_truth for r in records if math_score(_response(r.ground_truth), r.ground_truth) != 1.0]
    assert failed == []
    unequal = [r.ground_truth for r in records
               if not verify(parse(f"\\boxed{{{r.ground_truth}}}"), parse(_response(r.ground_truth)))]
    assert unequal == []


def test_garbage_and_empty_responses_score_zero():
    assert math_score("<think></think>", "5") == 0.0
    assert math_score("<think>x</think> \\boxed{\\frac{", "5") == 0.0


def test_works_off_the_main_thread():
    # math-verify's SIGALRM timeout cannot be installed off the main thread; the reward must still work.
    out = []
    thread = threading.Thread(target=lambda: out.append(math_score(_response("25"), "025")))
    thread.start()
    thread.join(timeout=60)
    assert out == [1.0]


def test_python_list_gold_text_means_alternatives():
    """Skywork-OR1-RL-Data stores golds as the text of a Python list: two answers must each
    score (math-verify alone reads "['10', '12']" as the interval (10, 12))."""
    assert gold_answers("['10', '12']") == ["10", "12"]
    assert gold_answers("['56']") == ["56"]
    assert gold_answers("[0, 1]") == ["[0, 1]"]  # still one answer, as before
    assert gold_answers("['unclosed") == ["['unclosed"]
    for answer, score in (("10", 1.0), ("12", 1.0), ("11", 0.0)):
        assert math_score(_response(answer), "['10', '12']") == score, answer


def test_the_last_box_of_the_final_answer_is_graded():
    corrected = "<think>\nwork\n</think>\nSo \\boxed{107}. Wait, I made an error: \\boxed{104}."
    assert math_score(corrected, "104") == 1.0
    assert math_score(corrected, "107") == 0.0
    two = "<think>\nwork\n</think>\nEither \\boxed{9} or rather \\boxed{8}."
    assert math_score(two, "8") == 1.0
    merged = RewardConfig(math_boxed="all")  # the old behaviour, for comparison
    assert math_score(corrected, "104", config=merged) == 0.0  # math-verify merged to 107104
    assert math_score(two, "8", config=merged) == 0.0          # and to the set {8, 9}
    nested = "<think>x</think> \\boxed{3} then \\boxed{\\frac{1}{2}}"
    assert math_score(nested, "1/2") == 1.0


def test_released_mode_reproduces_each_released_rule():
    from or1_megatron.rewards import registry

    released = RewardConfig(compat="released")
    previous = registry.get_reward_config()
    answer = "<think>\nwork\n</think>\nThe answer is \\boxed{25}."
    try:
        registry.set_reward_config(released)
        score = lambda *a, **k: compute_score(*a, **k)  # noqa: E731
        # no truncation rule: a length-cut response is graded
        cut = {"finish_reason": "length"}
        assert score("aime", answer, "025", cut) == 1.0
        # only the text between the first and the second </think> is graded
        second = "<think>a</think> \\boxed{5} </think> \\boxed{6}"
        assert score("aime", second, "5") == 1.0 and score("aime", second, "6") == 0.0
        # routing by the ground truth's content: a math gold under a code-like source is math,
        # a code schema under a math source is code
        assert score("leetcode", answer, "25") == 1.0
        code = "<think>x</think>\n```python\nprint(int(input()) * 2)\n```"
        assert score("aime", code, {"inputs": ["3\n"], "outputs": ["6\n"]}) == 1.0
        # json.loads or the raw text: a Python-list text reaches math-verify as an interval
        assert score("aime", "<think>x</think> \\boxed{10}", "['10', '12']") == 0.0
        assert score("aime", "<think>x</think> \\boxed{10}", '["10", "12"]') == 1.0
        # every box goes to math-verify, merged
        assert score("aime", "<think>x</think> \\boxed{9} no, \\boxed{8}", "8") == 0.0
    finally:
        registry.set_reward_config(previous)
    # the same cases under the default (or1) rules
    assert compute_score("aime", answer, "025", {"finish_reason": "length"}) == 0.0
    assert compute_score("aime", "<think>a</think> \\boxed{5} </think> \\boxed{6}", "6") == 1.0
    assert compute_score("aime", "<think>x</think> \\boxed{10}", "['10', '12']") == 1.0
