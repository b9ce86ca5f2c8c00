"""The reward pool: order kept, and no task can crash or hang it."""
import time

from or1_megatron.rewards import RewardPool

# Importable by the spawned workers under the name pytest gave this package ("tests." or none).
PLUGINS = [__name__.rpartition(".")[0] + ".reward_plugins_for_tests" if "." in __name__
           else "reward_plugins_for_tests"]


def _task(ability, value="1"):
    return {"data_source": "x", "solution_str": "", "ground_truth": value,
            "extra_info": {"ability": ability}}


def test_crashing_hanging_and_bad_tasks_score_zero_and_the_pool_survives():
    tasks = [_task("echo", "1"), _task("crash"), _task("echo", "0.5"), _task("hang"),
             _task("no-such-ability"), _task("math", "7"), _task("echo", "0.25")]
    tasks[5]["solution_str"] = "<think>x</think> \\boxed{7}"
    with RewardPool(num_workers=2, task_timeout_s=4.0, reward_modules=PLUGINS) as pool:
        start = time.monotonic()
        scores = pool.map(tasks)
        assert time.monotonic() - start < 60
        assert scores == [1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.25]
        errors = dict(pool.errors)
        assert set(errors) == {1, 3, 4}
        assert errors[1] == "reward worker died" and "timed out" in errors[3]
        assert "no reward registered for ability 'no-such-ability'" in errors[4]
        # Still serving after losing two workers.
        assert pool.map([_task("echo", "0.75")] * 3) == [0.75] * 3 and pool.errors == []


def test_a_malformed_gold_scores_zero_for_its_own_sample_only_in_both_modes():
    """The released scorer zeroes the whole chunk a bad row is graded in; here only that row."""
    from or1_megatron.rewards import RewardConfig

    right = "<think>x</think> \\boxed{25}"
    bad_code_gold = {"inputs": ["1", "2"], "outputs": ["1"]}  # lengths differ: no schema fits
    tasks = [{"data_source": "aime", "solution_str": right, "ground_truth": "25"},
             {"data_source": "livecodebench", "solution_str": right, "ground_truth": bad_code_gold},
             {"data_source": "aime", "solution_str": right, "ground_truth": "['25', '26']"}]
    for mode in ("or1", "released"):
        with RewardPool(num_workers=2, config=RewardConfig(compat=mode), task_timeout_s=30) as pool:
            scores = pool.map(tasks)
        assert scores[1] == 0.0 and scores[0] == 1.0, (mode, scores)
        # the released scorer reads "['25', '26']" as one text; ours as two answers
        assert scores[2] == (1.0 if mode == "or1" else 0.0), (mode, scores)
