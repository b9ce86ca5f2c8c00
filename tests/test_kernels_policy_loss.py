"""policy_loss against an fp64 oracle written in PPO's objective form, plus its metrics."""
import pytest
import torch

from or1_megatron.kernels import policy_loss


def _batch(shape=(4, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=gen) * 3
    # Ratios spread over [0.5, 1.6]: both clip ranges and the dual clip are hit.
    logprob = (old + (torch.rand(shape, generator=gen) - 0.45) * 1.0).requires_grad_()
    adv = torch.randn(shape, generator=gen) * 2
    mask = torch.rand(shape, generator=gen) > 0.3
    entropy = (torch.rand(shape, generator=gen) * 2).requires_grad_()
    return logprob, old, adv, mask, entropy


def _oracle(logprob, old, adv, mask, entropy, clip_low, clip_high, dual_clip, coef, count):
    """Per-token fp64 objective: -max(min(rA, clip(r)A), cA if A < 0) - coef * H, masked sum / N."""
    lp, old, adv, ent = logprob.double(), old.double(), adv.double(), entropy.double()
    ratio = torch.exp(lp - old)
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
    per_token = -objective - coef * ent
    return (per_token * mask.double()).sum() / count


@pytest.mark.parametrize(
    "clip_low, clip_high, dual_clip, coef",
    [(0.2, 0.2, None, 0.0), (0.2, 0.28, None, 0.003), (0.2, 0.28, 1.4, 0.01), (0.1, 0.5, 1.2, 0.0)],
)
def test_loss_and_grads_match_fp64_oracle(clip_low, clip_high, dual_clip, coef):
    logprob, old, adv, mask, entropy = _batch()
    count = 50  # the global count: larger than this micro-batch's tokens
    loss, _ = policy_loss(
        logprob, old, adv, mask, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        entropy=entropy, entropy_coef=coef, global_token_count=count,
    )
    ref = _oracle(logprob, old, adv, mask, entropy, clip_low, clip_high, dual_clip, coef, count)
    torch.testing.assert_close(loss.double(), ref, atol=1e-7, rtol=1e-6)
    got = torch.autograd.grad(loss, (logprob, entropy), allow_unused=True)
    want = torch.autograd.grad(ref, (logprob, entropy), allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(logprob) if g is None else g
        w = torch.zeros_like(logprob) if w is None else w
        torch.testing.assert_close(g.double(), w.double(), atol=1e-7, rtol=1e-6)


def test_metrics_are_exact_sums():
    logprob, old, adv, mask, entropy = _batch(seed=1)
    _, metrics = policy_loss(
        logprob, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=1.5,
        entropy=entropy, global_token_count=int(mask.sum()),
    )
    ratio = torch.exp(logprob.detach().double() - old.double())
    low = mask & (adv < 0) & (ratio < 0.8)
    high = mask & (adv > 0) & (ratio > 1.28)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    dual = mask & (adv < 0) & (pg > -1.5 * adv)
    assert metrics["tokens"].item() == mask.sum().item()
    assert metrics["clipfrac_low_sum"].item() == low.sum().item() > 0
    assert metrics["clipfrac_high_sum"].item() == high.sum().item() > 0
    assert metrics["clipfrac_sum"].item() == (low | high).sum().item()
    assert metrics["dual_clipfrac_sum"].item() == dual.sum().item() > 0
    kl = ((old.double() - logprob.detach().double()) * mask).sum()
    torch.testing.assert_close(metrics["approx_kl_sum"].double(), kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["entropy_sum"].double(), (entropy.detach().double() * mask).sum())
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())


def test_micro_batches_over_dp_ranks_give_the_global_token_mean():
    logprob, old, adv, mask, entropy = _batch(shape=(8, 7), seed=2)
    count = int(mask.sum())
    full, _ = policy_loss(logprob, old, adv, mask, entropy=entropy, entropy_coef=0.01, global_token_count=count)
    # 2 DP ranks x 2 micro-batches of 2 sequences, each normalised by the same global count.
    parts = [
        policy_loss(logprob[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2],
                    entropy=entropy[i : i + 2], entropy_coef=0.01, global_token_count=count)[0]
        for i in range(0, 8, 2)
    ]
    torch.testing.assert_close(sum(parts), full)
    g_full = torch.autograd.grad(full, logprob)[0]
    g_parts = torch.autograd.grad(sum(parts), logprob)[0]
    torch.testing.assert_close(g_parts, g_full)


def test_masked_padding_with_inf_logprob_is_ignored():
    logprob, old, adv, mask, entropy = _batch(seed=3)
    logprob = logprob.detach().clone()
    logprob[~mask] = float("-inf")
    logprob.requires_grad_()
    loss, metrics = policy_loss(logprob, old, adv, mask, entropy=entropy, entropy_coef=0.01, global_token_count=10)
    (grad,) = torch.autograd.grad(loss, logprob)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert all(torch.isfinite(value) for value in metrics.values())


def test_count_may_be_a_device_tensor():
    logprob, old, adv, mask, _ = _batch(seed=4)
    a, _ = policy_loss(logprob, old, adv, mask, global_token_count=torch.tensor(17.0))
    b, _ = policy_loss(logprob, old, adv, mask, global_token_count=17)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"old_logprob": torch.zeros(3)}, "old_logprob must have the shape of logprob"),
        ({"entropy": torch.zeros(2, 2)}, "entropy must have the shape of logprob"),
        ({"clip_low": 1.0}, "clip_low must be in"),
        ({"clip_high": -0.1}, "clip_high must be >= 0"),
        ({"dual_clip": 1.0}, "dual_clip must be None or > 1"),
        ({"entropy_coef": 0.01}, "no entropy was given"),
        ({"global_token_count": 0}, "global_token_count must be > 0"),
        ({"global_token_count": torch.ones(2)}, "global_token_count must be a scalar"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    logprob, old, adv, mask, _ = _batch()
    args = {"old_logprob": old, "global_token_count": 10, **kwargs}
    old_arg = args.pop("old_logprob")
    with pytest.raises(ValueError, match=message):
        policy_loss(logprob, old_arg, adv, mask, **args)
