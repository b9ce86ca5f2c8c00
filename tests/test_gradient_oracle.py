"""Gradients of the OR1 loss against an oracle that shares no code with the trainer.

The oracle: `transformers`' Qwen2 in fp64 on the same HF weights, full-softmax log-probs and
entropies, and the loss written out here from its definition (token-level PPO clip with
clip-higher, minus the entropy bonus, summed over every response token of the batch and divided
by their global count). The trainer: `ranks.train_policy`, the function `or1 train` runs on
every rank (data-parallel split, packing into several micro-batches, the fused kernel, megatron's
schedule and gradient reduction), at world 1, TP2, PP2 and DP2. Its gradients are read from
megatron's gradient buffers after the step and mapped to HF names through the Qwen2 mapping.
"""
from __future__ import annotations

import pytest
import torch

from or1_megatron.controller import ranks
from or1_megatron.controller.batch import TrainBatch, TrainSample
from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.policy.export import iter_stage_hf_tensors
from or1_megatron.tiny_model import make_tiny_qwen2
from tests.policy_support import policy_config, random_sequences

VOCAB = 300
CLIP_LOW, CLIP_HIGH, ENTROPY_COEF = 0.2, 0.28, 0.1
PROMPT_LENGTH = 4
LENGTHS = (9, 14, 7, 12, 10, 6)
ADVANTAGES = (1.0, -1.0, 0.5, -0.5, 2.0, -2.0)
# name: (tp, pp, world, model.recompute)
LAYOUTS = {"world1": (1, 1, 1, "none"), "tp2": (2, 1, 2, "none"), "pp2": (1, 2, 2, "none"),
           "dp2": (1, 1, 2, "none"), "tp2_selective": (2, 1, 2, "selective"),
           "pp2_full_recompute": (1, 2, 2, "full")}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), vocab_size=VOCAB)


def _oracle_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)


def _logprob_entropy(model, sequence: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([sequence])
    logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)  # position j predicts j + 1
    return logp.gather(-1, ids[0, 1:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.fixture(scope="module")
def batch(hf_dir) -> TrainBatch:
    """Six samples; old log-probs 0.3 nats (std) off the policy's, so some ratios are clipped."""
    model = _oracle_model(hf_dir)
    samples = [TrainSample(s[:PROMPT_LENGTH], s[PROMPT_LENGTH:], advantage, group=i // 2)
               for i, (s, advantage) in enumerate(zip(random_sequences(VOCAB, LENGTHS, seed=7),
                                                      ADVANTAGES, strict=True))]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        old = [_logprob_entropy(model, s.sequence)[0].float() for s in samples]
    return TrainBatch(samples, [o + 0.3 * torch.randn(o.shape, generator=g) for o in old])


def oracle_gradients(hf_dir, batch: TrainBatch) -> dict[str, torch.Tensor]:
    model = _oracle_model(hf_dir)
    total_tokens = sum(len(s.response_ids) for s in batch.samples)
    loss = torch.zeros((), dtype=torch.float64)
    for sample, old in zip(batch.samples, batch.old_logprobs, strict=True):
        logprob, entropy = _logprob_entropy(model, sample.sequence)
        mask = torch.zeros_like(logprob)
        mask[PROMPT_LENGTH - 1:] = 1.0  # positions that predict response tokens
        ratio = torch.exp(logprob - old.double())
        advantage = sample.advantage
        surrogate = torch.maximum(-advantage * ratio,
                                  -advantage * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
        loss = loss + ((surrogate - ENTROPY_COEF * entropy) * mask).sum() / total_tokens
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def rank_gradients(rank, world, hf_dir, tp, pp, recompute, batch):
    config = policy_config(hf_dir, tp, pp, world, **{"optim.clip_grad": 0.0,
                                                     "parallel.distributed_optimizer": False,
                                                     "model.recompute": recompute})
    state = ranks.setup_policy_rank(rank, world, config)
    metrics = ranks.train_policy(state, batch, list(range(len(batch.samples))), ENTROPY_COEF,
                                 CLIP_LOW, CLIP_HIGH, 0.0)
    worker = state.worker
    # The gradients megatron reduced into its buffers, read through the trainer's own export
    # (the Qwen2 mapping from megatron's TP shards to HF tensors).
    params = list(worker.unwrapped.parameters())
    weights = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad.to(p.dtype).view_as(p)
        grads = {name: t.clone() for name, t in iter_stage_hf_tensors(worker.unwrapped,
                                                                        worker.mapping, worker.layout)}
    finally:
        for p, w in zip(params, weights, strict=True):
            p.data = w
    keep = worker.layout.dp_rank == 0 and worker.layout.tp_rank == 0
    return (grads if keep else {}), metrics


def trainer_gradients(hf_dir, layout: str, batch: TrainBatch) -> dict[str, torch.Tensor]:
    tp, pp, world, recompute = LAYOUTS[layout]
    merged: dict[str, torch.Tensor] = {}
    for grads, metrics in run_forked(rank_gradients, world, hf_dir, tp, pp, recompute, batch, timeout_s=120):
        assert metrics["clipfrac_sum"] > 0  # clipping is part of what is compared
        merged.update(grads)
    return merged


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_gradients_equal_the_fp64_transformers_oracle(hf_dir, batch, layout):
    expected = oracle_gradients(hf_dir, batch)
    got = trainer_gradients(hf_dir, layout, batch)
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        scale = want.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name].double(), want, atol=2e-5 * scale, rtol=1e-4,
                                   msg=lambda m, name=name: f"{layout} {name}: {m}")
