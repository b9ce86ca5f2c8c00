"""Importance-sampling correction (algo.is_correction): the weights against a hand computation on
a fixed batch, the loss they scale, and the identity: engine == trainer gives the loss without IS."""
import math

import pytest
import torch

from or1_megatron.algo.importance import aligned_engine_logprobs, importance_weights
from or1_megatron.kernels import policy_loss

# One sample: a 3-token prompt, a 4-token response; positions 2..5 predict the response.
PROMPT = 3
OLD = torch.tensor([0.0, 0.0, -1.0, -0.5, -2.0, -0.1])        # the trainer's old log-probs
ENGINE = [-1.5, -0.4, -2.0, -1.5]                               # the engine's, per response token
MASK = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])


def test_weights_equal_a_hand_computation():
    engine = aligned_engine_logprobs(PROMPT, ENGINE)
    assert engine.tolist() == pytest.approx([0.0, 0.0, -1.5, -0.4, -2.0, -1.5])
    # ratios pi_old / pi_engine: e^0.5, e^-0.1, e^0, e^1.4 (1.65, 0.90, 1.0, 4.06)
    ratios = [math.exp(0.5), math.exp(-0.1), 1.0, math.exp(1.4)]
    tis, stats = importance_weights(OLD, engine, MASK, "tis", cap=2.0)
    assert tis.tolist() == pytest.approx([1.0, 1.0, ratios[0], ratios[1], 1.0, 2.0], rel=1e-6)
    mis, _ = importance_weights(OLD, engine, MASK, "mis", cap=2.0)
    assert mis.tolist() == pytest.approx([1.0, 1.0, ratios[0], ratios[1], 1.0, 0.0], rel=1e-6)
    none, _ = importance_weights(OLD, engine, MASK, "none", cap=2.0)
    assert none.tolist() == [1.0] * 6
    assert stats.tokens == 4 and stats.capped == 1
    assert stats.abs_log_ratio_sum == pytest.approx(0.5 + 0.1 + 0.0 + 1.4)
    assert stats.metrics() == pytest.approx({"mismatch/abs_log_ratio_mean": 2.0 / 4,
                                             "mismatch/capped_fraction": 0.25})


def test_the_weights_scale_each_tokens_policy_gradient_term():
    engine = aligned_engine_logprobs(PROMPT, ENGINE)
    weights, _ = importance_weights(OLD, engine, MASK, "tis", cap=2.0)
    logprob = (OLD + torch.tensor([0.0, 0.0, 0.1, -0.3, 0.05, 0.2])).requires_grad_()
    adv = MASK * 1.5
    loss, metrics = policy_loss(logprob, OLD, adv, MASK, clip_low=0.2, clip_high=0.28,
                                global_token_count=4, is_weight=weights)
    ratio = torch.exp(logprob.detach().double() - OLD.double())
    pg = torch.maximum(-adv.double() * ratio, -adv.double() * ratio.clamp(0.8, 1.28))
    expected = (pg * weights.double() * MASK.double()).sum() / 4
    torch.testing.assert_close(loss.double(), expected)
    assert float(metrics["pg_loss_sum"]) == pytest.approx(float(expected * 4), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logprob)
    # a token the cap truncated (weight 2) moves twice as hard as an unweighted one would
    assert grad[5] != 0 and weights[5] == 2.0


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_an_engine_equal_to_the_trainer_gives_the_loss_without_correction(mode):
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(6, generator=gen) * 3
    engine = torch.where(MASK.bool(), old, torch.zeros(()))  # what a perfect sync would return
    weights, stats = importance_weights(old, engine, MASK, mode, cap=1.5)
    logprob = (old + (torch.rand(6, generator=gen) - 0.5)).requires_grad_()
    adv = MASK * -0.7
    with_is, _ = policy_loss(logprob, old, adv, MASK, global_token_count=4, is_weight=weights)
    without, _ = policy_loss(logprob, old, adv, MASK, global_token_count=4)
    assert torch.equal(with_is, without)
    assert torch.equal(*(torch.autograd.grad(x, logprob, retain_graph=True)[0] for x in (with_is, without)))
    assert stats.capped == 0 and stats.abs_log_ratio_sum == 0.0


def test_misaligned_or_unknown_input_is_refused():
    with pytest.raises(ValueError, match="do not align"):
        importance_weights(OLD, torch.zeros(5), MASK, "tis", 2.0)
    with pytest.raises(ValueError, match="must be one of"):
        importance_weights(OLD, OLD, MASK, "is", 2.0)
