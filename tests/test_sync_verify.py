"""The probe's tolerance follows the policy's dtype: a bf16 engine serving the trainer's weights
passes under the bf16 rule (and would fail the fp32 one), while weights that are wrong fail
under either. Real numbers from a tiny Qwen2: engine = greedy bf16 continuation with its own
log-probs, trainer = the fp32 model scoring those sequences."""
from __future__ import annotations

import copy

import pytest
import torch

from or1_megatron.rollout.engine import GenerateResult
from or1_megatron.sync import verify as probe
from or1_megatron.sync.plan import SyncVerificationError
from tests.rollout_testutil import load_model, make_tiny_qwen2

VOCAB = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model"))


def _engine_results(engine, prompts, new_tokens=8) -> list[GenerateResult]:
    results = []
    for k, prompt in enumerate(prompts):
        ids, logprobs = list(prompt), []
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = engine(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            ids.append(token)
            logprobs.append(float(lp[token]))
        results.append(GenerateResult(f"p{k}", ids[len(prompt):], logprobs, "length", "1", {}))
    return results


def _trainer_scores(trainer, prompts, results) -> dict[tuple[int, ...], list[float]]:
    scores = {}
    for sequence in probe.probe_sequences(prompts, results):
        with torch.no_grad():
            lp = torch.log_softmax(trainer(torch.tensor([sequence])).logits[0].float(), -1)
        scores[tuple(sequence)] = [float(lp[j, sequence[j + 1]]) for j in range(len(sequence) - 1)]
    return scores


def _perturbed(model, relative: float):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(relative * p.std() * torch.randn(p.shape, generator=g))
    return other


def test_bf16_engine_passes_the_bf16_rule_and_wrong_weights_fail_it(model):
    prompts = probe.probe_prompts(VOCAB, 8)
    bf16_engine = copy.deepcopy(model).to(torch.bfloat16)
    results = _engine_results(bf16_engine, prompts)
    trainer = _trainer_scores(model, prompts, results)
    worst = probe.compare("engine 0", prompts, results, trainer, probe.tolerance("bf16"))
    assert 1e-3 < worst <= 0.5  # visibly off on some token, as bf16 is
    with pytest.raises(SyncVerificationError, match=r"engine 0: .* \(> 0.001, sync.verify_tolerance\)"):
        probe.compare("engine 0", prompts, results, trainer, probe.tolerance("fp32"))
    # the engine's weights 3% off the trainer's: every token moves
    wrong = _trainer_scores(_perturbed(model, 0.03), prompts, results)
    with pytest.raises(SyncVerificationError, match="its weights are not the trainer's"):
        probe.compare("engine 0", prompts, results, wrong, probe.tolerance("bf16"))


def test_fp32_rule_passes_equal_weights_and_catches_a_small_change(model):
    prompts = probe.probe_prompts(VOCAB, 4)
    results = _engine_results(model, prompts)
    assert probe.compare("e", prompts, results, _trainer_scores(model, prompts, results),
                         probe.tolerance("fp32")) < 1e-5
    with pytest.raises(SyncVerificationError):
        probe.compare("e", prompts, results,
                      _trainer_scores(_perturbed(model, 0.001), prompts, results),
                      probe.tolerance("fp32"))


def test_explicit_bounds_override_the_dtype_rule():
    assert probe.tolerance("bf16", max_abs=0.1) == probe.Tolerance(max_abs=0.1, mean_abs=5e-2)
    assert probe.tolerance("fp32") == probe.Tolerance(max_abs=1e-3, mean_abs=1e-4)


def test_the_mean_bound_catches_what_no_single_token_shows():
    prompts = [[1, 2, 3]]
    results = [GenerateResult("p", [4, 5, 6, 7], [-1.0, -1.0, -1.0, -1.0], "length", "1", {})]
    trainer = {(1, 2, 3, 4, 5, 6, 7): [0.0, 0.0, -1.3, -1.3, -1.3, -1.3]}  # every token 0.3 off
    rule = probe.Tolerance(max_abs=0.5, mean_abs=0.05)
    with pytest.raises(SyncVerificationError, match="on average over 4 probe tokens"):
        probe.compare("e", prompts, results, trainer, rule)
