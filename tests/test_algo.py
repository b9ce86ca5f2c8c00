"""GRPO advantages, rejection sampling and adaptive entropy control against hand computation."""
import math

import pytest
import torch

from or1_megatron.algo import AdaptiveEntropyController, filter_uniform_groups, group_advantages


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = group_advantages(rewards, eps=0.0)
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[0].tolist() == pytest.approx([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0])
    std1 = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)
    assert adv[1].tolist() == pytest.approx([-0.25 / std1] * 3 + [0.75 / std1])
    assert adv.sum(dim=1).abs().max() < 1e-6


def test_uniform_groups_have_zero_advantage_and_are_dropped():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    assert group_advantages(rewards)[[0, 1, 3]].abs().max() == 0
    result = filter_uniform_groups(rewards)
    assert result.keep.tolist() == [False, False, True, False]
    assert (result.solve_none, result.solve_all, result.uniform_other, result.kept) == (1, 1, 1, 1)
    assert result.metrics()["rollout/solve_all"] == 0.25


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[prompts, group_size\]"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[prompts, group_size\]"):
        filter_uniform_groups(torch.zeros(2, 2, 2))


def test_entropy_controller_follows_the_paper_rule():
    ctrl = AdaptiveEntropyController(target=0.2, delta=0.005, coef_min=0.0, coef_max=0.012)
    # below target: the bonus uses c before the update, then c grows by delta
    assert ctrl.step(0.1) == 0.0 and ctrl.coef == pytest.approx(0.005)
    assert ctrl.step(0.1) == pytest.approx(0.005) and ctrl.coef == pytest.approx(0.010)
    assert ctrl.step(0.15) == pytest.approx(0.010) and ctrl.coef == pytest.approx(0.012)  # clamped
    # above target: no bonus at all, c shrinks
    assert ctrl.step(0.3) == 0.0 and ctrl.coef == pytest.approx(0.007)
    # exactly at target: bonus applies (e <= target) and c shrinks (not e < target)
    assert ctrl.step(0.2) == pytest.approx(0.007) and ctrl.coef == pytest.approx(0.002)
    assert ctrl.step(0.9) == 0.0 and ctrl.coef == 0.0  # clamped at coef_min


def test_entropy_controller_state_round_trips():
    ctrl = AdaptiveEntropyController(target=0.2, delta=1e-4, coef_max=5e-3)
    for e in (0.1, 0.1, 0.3, 0.1):
        ctrl.step(e)
    resumed = AdaptiveEntropyController(target=0.2, delta=1e-4, coef_max=5e-3)  # from the config
    resumed.load_state_dict(ctrl.state_dict())
    assert resumed == ctrl
    assert [resumed.step(e) for e in (0.1, 0.25)] == [ctrl.step(e) for e in (0.1, 0.25)]
    # a new stage's config keeps its own hyper-parameters; the carried coefficient is clamped
    next_stage = AdaptiveEntropyController(target=0.3, delta=1e-3, coef_max=1e-4)
    next_stage.load_state_dict(ctrl.state_dict())
    assert (next_stage.target, next_stage.delta, next_stage.coef) == (0.3, 1e-3, 1e-4)
    with pytest.raises(KeyError, match="bogus"):
        resumed.load_state_dict({"bogus": 1.0})
    with pytest.raises(ValueError, match="coef_min"):
        AdaptiveEntropyController(coef_min=0.1, coef_max=0.0)
