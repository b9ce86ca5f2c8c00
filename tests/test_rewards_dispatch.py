"""verl-compatible dispatch: extra_info["ability"] first, then the data source name; plug-ins."""
import pytest

from or1_megatron.rewards import ability_of, compute_score, register_reward
from or1_megatron.rewards.registry import UnknownAbilityError, _registry


@pytest.mark.parametrize("source, ability", [
    ("test-math-aime24", "math"), ("Skywork/Skywork-OR1-RL-Data", "math"), ("leetcode", "code"),
    ("LiveCodeBench", "code"), ("taco", "code"), ("deepcoder_code", "code"),
])
def test_ability_from_data_source(source, ability):
    assert ability_of(source) == ability


def test_extra_info_ability_wins_over_data_source():
    assert ability_of("leetcode", {"ability": "math"}) == "math"
    response = "<think>x</think> \\boxed{7}"
    assert compute_score("leetcode", response, "7", {"ability": "math"}) == 1.0


def test_plugged_reward_and_unknown_ability():
    @register_reward("length")
    def length_reward(data_source, solution_str, ground_truth, extra_info=None):
        return float(len(solution_str) == int(ground_truth))

    try:
        assert compute_score("x", "abcd", "4", {"ability": "length"}) == 1.0
        with pytest.raises(UnknownAbilityError, match="no reward registered for ability 'poetry'"):
            compute_score("x", "abcd", "4", {"ability": "poetry"})
    finally:
        _registry.pop("length")
