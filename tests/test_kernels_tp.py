"""Vocab-parallel (TP=2, gloo) logprob/entropy against the fp64 single-process oracle.

Each rank builds the same full weight from a seed, keeps its contiguous shard (Megatron's layout)
and checks its values, its full hidden gradient and its shard's weight gradient.
"""
import pytest
import torch

from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.kernels import fused_logprob_entropy, naive_logprob_entropy
from or1_megatron.kernels.reference import oracle_errors

TOKENS, HIDDEN, V_LOCAL = 23, 16, 40


def _rank_check(rank, world_size, path, valid, temperature, chunk):
    gen = torch.Generator().manual_seed(1)
    full_weight = torch.randn(V_LOCAL * world_size, HIDDEN, generator=gen) * 0.5
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen).requires_grad_()
    targets = torch.randint(0, valid, (TOKENS,), generator=gen)
    targets[:2] = torch.tensor([0, valid - 1])  # the first and the last valid id, on either rank
    g_lp, g_ent = torch.randn(TOKENS, generator=gen), torch.randn(TOKENS, generator=gen)
    shard = (rank * V_LOCAL, (rank + 1) * V_LOCAL)
    weight = full_weight[shard[0] : shard[1]].clone().requires_grad_()
    group = torch.distributed.group.WORLD
    if path == "fused":
        lp, ent = fused_logprob_entropy(
            hidden, weight, targets, temperature, group, valid, vocab_chunk=chunk, impl="torch"
        )
    else:
        lp, ent = naive_logprob_entropy(hidden, weight, targets, temperature, group, valid)
    gh, gw = torch.autograd.grad((g_lp * lp + g_ent * ent).sum(), (hidden, weight))
    errors = oracle_errors(
        hidden, full_weight, targets, lp, ent, gh, gw, g_lp, g_ent, temperature, valid, shard
    )
    padded_rows_zero = bool(torch.all(gw[max(0, valid - shard[0]) :] == 0))
    return errors, lp.detach(), ent.detach(), padded_rows_zero


@pytest.mark.parametrize("path", ["fused", "naive"])
@pytest.mark.parametrize(
    "valid, temperature, chunk",
    [
        (80, 1.0, 8),  # no padding, T=23 not a multiple of the chunk
        (70, 0.7, 5),  # rank 1 holds 10 padded ids
        (35, 1.3, 64),  # rank 1 holds only padding: its stats are empty
    ],
)
def test_tp2_matches_single_process_oracle(path, valid, temperature, chunk):
    results = run_forked(_rank_check, 2, path, valid, temperature, chunk, timeout_s=120)
    for rank, (errors, _, _, padded_rows_zero) in enumerate(results):
        assert max(errors.values()) < 2e-5, (rank, errors)
        assert padded_rows_zero, f"rank {rank}: padded vocabulary rows got a nonzero gradient"
    # Every rank of the TP group returns the same full-vocabulary values.
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
