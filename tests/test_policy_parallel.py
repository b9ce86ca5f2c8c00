"""The Megatron policy at TP/PP/DP/SP layouts against one process and against transformers.

Ranks are forked from this process (megatron is imported once, here), so each layout costs
about a second. Every comparison is against an oracle: transformers' fp64 forward for
log-probabilities, entropies and logits; the world-size-1 run for losses, gradient norms and
updated weights.
"""
from __future__ import annotations

import json
import pytest
import torch

from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.policy.export import iter_stage_hf_tensors
from or1_megatron.policy.packing import pack, plan_micro_batches
from or1_megatron.policy.worker import PolicyWorker
from or1_megatron.tiny_model import make_tiny_qwen2
from or1_megatron.policy.oracle import transformers_oracle
from tests.policy_support import policy_config, random_sequences

VOCAB = 300
LENGTHS = (7, 12, 5, 9, 16, 3, 11, 2)
SEQUENCES = random_sequences(VOCAB, LENGTHS)
PREDICTED = sum(n - 1 for n in LENGTHS)
LAYOUTS = {  # name: (tp, pp, world, sequence_parallel)
    "tp2": (2, 1, 2, False),
    "pp2": (1, 2, 2, False),
    "dp2": (1, 1, 2, False),
    "tp2_pp2": (2, 2, 4, False),
    "tp2_sp": (2, 1, 2, True),
    "tp2_dp2": (2, 1, 4, False),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def oracle(hf_dir):
    return transformers_oracle(hf_dir, SEQUENCES)


def sft_loss(logprob, entropy, mb):
    """Token-mean NLL minus an entropy bonus: trains through both kernel outputs."""
    mask = mb.target_mask
    loss = (-(logprob * mask).sum() - 0.1 * (entropy * mask).sum()) / PREDICTED
    return loss, {"tokens": mask.sum().float()}


def hf_weights(worker: PolicyWorker) -> dict[str, torch.Tensor]:
    return dict(iter_stage_hf_tensors(worker.unwrapped, worker.mapping, worker.layout))


def merge_stages(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    merged = {}
    for weights in per_rank:
        merged.update(weights)
    return merged


# -- rank functions (run in forked ranks) -----------------------------------------------------

def rank_logprobs(rank, world, hf_dir, tp, pp, sp):
    worker = PolicyWorker(policy_config(hf_dir, tp, pp, world, **{"parallel.sequence_parallel": sp}))
    results = worker.compute_logprobs(SEQUENCES)
    return None if results is None else [(r.logprob, r.entropy) for r in results]


def rank_logits(rank, world, hf_dir):
    worker = PolicyWorker(policy_config(hf_dir))
    mb = pack(SEQUENCES, list(range(len(SEQUENCES))))
    with torch.no_grad():
        hidden = worker.unwrapped(input_ids=mb.tokens, position_ids=mb.position_ids,
                                  attention_mask=None, packed_seq_params=mb.packed_seq_params)
        logits = hidden.squeeze(1) @ worker.unwrapped.output_weight().T
    return logits[:, :VOCAB], mb.seq_lengths


def rank_train_step(rank, world, hf_dir, tp, pp, sp):
    worker = PolicyWorker(policy_config(hf_dir, tp, pp, world, **{"parallel.sequence_parallel": sp}))
    mine = SEQUENCES[worker.layout.dp_rank::worker.layout.dp_size]
    metrics = worker.train_step(mine, sft_loss)
    return metrics, hf_weights(worker)


def rank_two_steps(rank, world, hf_dir, switch_to_fused):
    """Two train steps; with `switch_to_fused`, torch's fused AdamW from the start and again after
    the first step (what a CUDA rank does at start-up and after loading optimizer state)."""
    from or1_megatron.policy.worker import use_fused_torch_adam

    worker = PolicyWorker(policy_config(hf_dir))
    switched = use_fused_torch_adam(worker.optimizer) if switch_to_fused else 0
    first = worker.train_step(SEQUENCES, sft_loss)
    if switch_to_fused:
        switched += use_fused_torch_adam(worker.optimizer)  # now with step counts in the state
    second = worker.train_step(SEQUENCES, sft_loss)
    groups = [g for o in getattr(worker.optimizer, "chained_optimizers", [worker.optimizer])
              for g in o.optimizer.param_groups]
    return switched, [(g["fused"], g["foreach"]) for g in groups], (first, second), hf_weights(worker)


def rank_save_after_step(rank, world, hf_dir, ckpt_dir):
    worker = PolicyWorker(policy_config(hf_dir, 2, 1, world))
    worker.train_step(SEQUENCES, sft_loss)
    worker.save_checkpoint(ckpt_dir, extra_state={"entropy_coef": 0.004, "sampler_position": 17})
    second = worker.train_step(SEQUENCES, sft_loss)
    return second, hf_weights(worker)


def rank_resume(rank, world, hf_dir, ckpt_dir, tp, pp):
    worker = PolicyWorker(policy_config(hf_dir, tp, pp, world))
    extra = worker.load_checkpoint(ckpt_dir)
    scores = worker.compute_logprobs(SEQUENCES)
    second = worker.train_step(SEQUENCES, sft_loss)
    return extra, worker.steps_done, scores and [s.logprob for s in scores], second, hf_weights(worker)


# -- tests ------------------------------------------------------------------------------------

def test_logits_equal_transformers(hf_dir, oracle):
    logits, lengths = run_forked(rank_logits, 1, hf_dir)[0]
    start = 0
    for seq_oracle, length in zip(oracle, lengths, strict=True):
        torch.testing.assert_close(logits[start:start + length].double(), seq_oracle["logits"],
                                   atol=2e-5, rtol=1e-5)
        start += length


@pytest.mark.parametrize("layout", ["single", *LAYOUTS])
def test_logprobs_and_entropy_equal_transformers(hf_dir, oracle, layout):
    tp, pp, world, sp = (1, 1, 1, False) if layout == "single" else LAYOUTS[layout]
    per_rank = run_forked(rank_logprobs, world, hf_dir, tp, pp, sp)
    last_stage = [r for r in per_rank if r is not None]
    assert len(last_stage) == world // pp  # every rank of the last stage has the results
    for logprob_entropy in last_stage:
        for (logprob, entropy), expected in zip(logprob_entropy, oracle, strict=True):
            torch.testing.assert_close(logprob.double(), expected["logprob"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy.double(), expected["entropy"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def single_process_step(hf_dir):
    initial = {}
    from safetensors.torch import load_file

    initial = load_file(str(hf_dir / "model.safetensors"))
    metrics, weights = run_forked(rank_train_step, 1, hf_dir, 1, 1, False)[0]
    return metrics, weights, initial


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step_equals_single_process(hf_dir, single_process_step, layout):
    ref_metrics, ref_weights, initial = single_process_step
    tp, pp, world, sp = LAYOUTS[layout]
    per_rank = run_forked(rank_train_step, world, hf_dir, tp, pp, sp)
    weights = merge_stages([w for _, w in per_rank])
    assert weights.keys() == ref_weights.keys() == initial.keys()
    for metrics, _ in per_rank:  # every rank reports the same global numbers
        assert metrics["tokens"] == PREDICTED
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], abs=1e-6)
        assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-6)
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=1e-6, msg=name)
    moved = max((ref_weights[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-4  # the step really changed the weights


def test_fused_adam_on_gpu_ranks_updates_like_the_default(hf_dir):
    _, ref_flags, ref_metrics, ref_weights = run_forked(rank_two_steps, 1, hf_dir, False)[0]
    switched, flags, metrics, weights = run_forked(rank_two_steps, 1, hf_dir, True)[0]
    assert not any(fused for fused, _ in ref_flags)
    assert switched >= 2 and flags and all(flag == (True, False) for flag in flags)
    for got, want in zip(metrics, ref_metrics, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    assert metrics[1]["loss"] != metrics[0]["loss"]  # the first update changed the model
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=1e-6, msg=name)


def test_checkpoint_saved_at_tp2_resumes_at_other_layouts(hf_dir, oracle, tmp_path):
    ckpt = tmp_path / "step1"
    per_rank = run_forked(rank_save_after_step, 2, hf_dir, ckpt)
    uninterrupted_metrics, uninterrupted_weights = per_rank[0]
    assert (ckpt / "or1_checkpoint.json").is_file() and not (tmp_path / "step1.saving").exists()
    for tp, pp, world in [(1, 1, 1), (1, 2, 2), (2, 1, 2)]:
        results = run_forked(rank_resume, world, hf_dir, ckpt, tp, pp)
        extra, steps_done, _, metrics, _ = results[-1]
        assert extra == {"entropy_coef": 0.004, "sampler_position": 17}
        assert steps_done == 2
        assert metrics["loss"] == pytest.approx(uninterrupted_metrics["loss"], abs=1e-6)
        weights = merge_stages([r[4] for r in results])
        for name, ref in uninterrupted_weights.items():
            # optimizer state (moments, step count) came back too: the resumed update is the same
            torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=1e-6, msg=name)
    # the reloaded weights score differently from the initial ones (it is the trained model)
    scores = results[-1][2]
    assert any((s.double() - o["logprob"]).abs().max() > 1e-3
               for s, o in zip(scores, oracle, strict=True))


def rank_wrong_world(rank, world, hf_dir):
    PolicyWorker(policy_config(hf_dir, 1, 1, 2))


def test_world_size_mismatch_is_named(hf_dir):
    from or1_megatron.distributed.fork_launcher import RankFailed

    with pytest.raises(RankFailed, match="parallel.world_size=2 but 1 processes"):
        run_forked(rank_wrong_world, 1, hf_dir)


def test_micro_batch_planning():
    plan = plan_micro_batches([10, 3, 8, 5, 2], max_tokens=12)
    assert sorted(i for mb in plan for i in mb) == [0, 1, 2, 3, 4]
    assert all(sum([10, 3, 8, 5, 2][i] for i in mb) <= 12 for mb in plan)
    assert len(plan) == 3
    with pytest.raises(ValueError, match="sequence 1 has 13 tokens"):
        plan_micro_batches([4, 13], max_tokens=12)
    with pytest.raises(ValueError, match="sequence 0 has 1 token"):
        plan_micro_batches([1], max_tokens=12)


def test_packing_layout():
    mb = pack([[5, 6, 7], [8, 9]], [0, 1], pad_to_multiple=4,
              extras={"adv": [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]})
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert mb.cu_seqlens.tolist() == [0, 3, 5, 8]  # padding is its own segment
    assert mb.targets.tolist() == [6, 7, 0, 9, 0, 0, 0, 0]
    assert mb.target_mask.tolist() == [True, True, False, True, False, False, False, False]
    assert mb.extras["adv"].tolist() == [1.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="extra 'adv' of sequence 1 has shape"):
        pack([[5, 6, 7], [8, 9]], [0, 1], extras={"adv": [torch.zeros(2), torch.zeros(2)]})


def rank_save_before_any_step(rank, world, hf_dir, ckpt_dir):
    worker = PolicyWorker(policy_config(hf_dir, 2, 1, world))
    worker.save_checkpoint(ckpt_dir, extra_state={"step": 0})  # e.g. a run whose first batch was all-equal
    first = worker.train_step(SEQUENCES, sft_loss)
    return first, hf_weights(worker)


def test_checkpoint_before_the_first_step_resumes_with_a_fresh_optimizer(hf_dir, tmp_path):
    ckpt = tmp_path / "step0"
    uninterrupted_metrics, uninterrupted_weights = run_forked(rank_save_before_any_step, 2, hf_dir, ckpt)[0]
    assert json.loads((ckpt / "or1_checkpoint.json").read_text())["with_optimizer"] is False
    extra, steps_done, _, metrics, weights = run_forked(rank_resume, 2, hf_dir, ckpt, 2, 1)[0]
    assert extra == {"step": 0} and steps_done == 1
    assert metrics["loss"] == pytest.approx(uninterrupted_metrics["loss"], abs=1e-6)
    for name, ref in uninterrupted_weights.items():
        torch.testing.assert_close(weights[name], ref, atol=1e-6, rtol=1e-6, msg=name)


def rank_load_as_te(rank, world, hf_dir, ckpt_dir):
    """Save with the local spec, load into a model whose state has transformer-engine's
    `_extra_state` entries (what the TE spec adds next to its layers' weights)."""
    from megatron.core.dist_checkpointing import ShardedObject

    trained = PolicyWorker(policy_config(hf_dir))
    trained.train_step(SEQUENCES, sft_loss)
    trained.save_checkpoint(ckpt_dir)
    fresh = PolicyWorker(policy_config(hf_dir))
    plain = fresh.unwrapped.sharded_state_dict

    def with_te_extra_state(*args, **kwargs):
        sd = plain(*args, **kwargs)
        key = "decoder.layers.self_attention.linear_qkv._extra_state"
        sd[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        return sd

    fresh.unwrapped.sharded_state_dict = with_te_extra_state
    fresh.unwrapped.load_state_dict = _ignoring_extra_state(fresh.unwrapped.load_state_dict)
    fresh.load_checkpoint(ckpt_dir, with_optimizer=False)
    return hf_weights(trained), hf_weights(fresh)


def _ignoring_extra_state(load_state_dict):
    """The local model has no `_extra_state` keys to report as missing: as TE's would, it
    reports the dropped ones."""
    def load(state, strict=True):
        result = load_state_dict(state, strict=strict)
        result.missing_keys.append("decoder.layers.0.self_attention.linear_qkv._extra_state")
        return result
    return load


def test_a_local_spec_checkpoint_loads_where_te_expects_extra_state(hf_dir, tmp_path):
    trained, loaded = run_forked(rank_load_as_te, 1, hf_dir, tmp_path / "ckpt")[0]
    assert trained.keys() == loaded.keys()
    for name in trained:
        torch.testing.assert_close(loaded[name], trained[name], atol=0, rtol=0)
