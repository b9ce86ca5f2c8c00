"""`or1 eval` and estimate_difficulty end to end: a real CPU engine process, the real reward pool
(Math-Verify, the code reward), real problems from shared/data, on a model whose answer is known.

The model answers every prompt with `</think>\\boxed{204}` and EOS, with certainty: its attention
and MLP outputs are zero, so each next token depends only on the current one, and the embeddings
and LM head chain the prompt's last token (the `\\n` after `<think>`) through the answer's tokens.
204 is the answer of AIME24 problem 0 only, so correctness counts are known exactly: problem 0
solves every sample, the others none; cut one token short of EOS, every response is truncated and
OR1's rule scores it 0 although its text holds the right answer.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
import torch

from or1_megatron.data.filters import filter_by_pass_rate, load_pass_rates
from or1_megatron.data.loaders import load_problems
from or1_megatron.data.tokenizer import arithmetic_corpus, build_tokenizer
from or1_megatron.eval import command, difficulty
from or1_megatron.eval.sampling import SamplingSession, SamplingSettings, prompt_token_ids
from or1_megatron.rollout.launcher import free_port
from or1_megatron.tiny_model import tiny_qwen2_config
from tests.rollout_testutil import running_cpu_engines

ANSWER = "</think>\\boxed{204}"


def make_answering_model(out_dir: Path, answer: str) -> int:
    """A 1-layer Qwen2 + tokenizer directory that answers every R1-format prompt with `answer` + EOS.
    Returns the number of answer tokens (EOS excluded). The weights are written with safetensors
    directly: importing transformers' Qwen2 model class costs this process seconds it need not pay."""
    from safetensors.torch import save_file

    tokenizer = build_tokenizer(out_dir, arithmetic_corpus(300), vocab_size=400, model_max_length=4096)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    chain = newline[-1:] + answer_ids + [tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), "each chain token must have one successor"
    vocab, hidden, ffn, heads, kv_heads = 512, 64, 128, 4, 2
    config = tiny_qwen2_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                               num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                               max_position_embeddings=4096)
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    config.save_pretrained(out_dir)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=generator)

    kv = hidden // heads * kv_heads
    layer = "model.layers.0."
    weights = {
        layer + "self_attn.q_proj.weight": rand(hidden, hidden), layer + "self_attn.q_proj.bias": rand(hidden),
        layer + "self_attn.k_proj.weight": rand(kv, hidden), layer + "self_attn.k_proj.bias": rand(kv),
        layer + "self_attn.v_proj.weight": rand(kv, hidden), layer + "self_attn.v_proj.bias": rand(kv),
        # No attention or MLP output: the residual stream is the current token's embedding.
        layer + "self_attn.o_proj.weight": torch.zeros(hidden, hidden),
        layer + "mlp.gate_proj.weight": rand(ffn, hidden), layer + "mlp.up_proj.weight": rand(ffn, hidden),
        layer + "mlp.down_proj.weight": torch.zeros(hidden, ffn),
        layer + "input_layernorm.weight": torch.ones(hidden),
        layer + "post_attention_layernorm.weight": torch.ones(hidden),
        "model.norm.weight": torch.ones(hidden),
        "model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
    }
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    for i, (token, successor) in enumerate(zip(chain, chain[1:])):
        embed[token] = 0.0
        embed[token, i] = 1.0  # one axis per chain token; RMSNorm scales it to 8
        head[successor, i] = 10.0  # logit 80 for the successor: certain at temperature 1
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return len(answer_ids)


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("answering") / "model"
    return path, make_answering_model(path, ANSWER)


@pytest.fixture(scope="module")
def engines(answering_model, tmp_path_factory):
    """One CPU engine for the whole module (one, not more: start-up is most of this module's time
    on a loaded 2-core machine; spreading over engines is the router tests' job). The commands
    attach to it by URL."""
    with running_cpu_engines(answering_model[0], tmp_path_factory.mktemp("engine_logs"),
                             max_running_requests=32) as procs:
        yield procs


def _attach(engines) -> list[str]:
    return [arg for p in engines for arg in ("--engine-url", p.url)]


@pytest.fixture(scope="module")
def aime24(shared_data) -> Path:
    return shared_data / "eval" / "aime24.parquet"


def test_eval_defaults_k_per_source_and_reports_exact_counts(answering_model, engines, aime24,
                                                            shared_data, tmp_path, capsys):
    lcb = shared_data / "code" / "livecodebench_public_part1.json"
    out = tmp_path / "eval.json"
    rc = command.main(["--model-path", str(answering_model[0]), "--data", str(aime24), str(lcb),
                       "--limit", "2", "--max-new-tokens", "16", "--reward-workers", "1",
                       "--out", str(out), *_attach(engines)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    aime, code = report["metrics"]["test-math-aime24"], report["metrics"]["livecodebench"]
    # The paper's k per source: avg@32 for AIME, avg@4 for LiveCodeBench.
    assert (aime["k"], aime["problems"], code["k"], code["problems"]) == (32, 2, 4, 2)
    assert aime["avg@k"] == 0.5 and aime["pass@k"] == 0.5 and aime["truncated"] == 0.0
    assert code["avg@k"] == 0.0 and code["pass@k"] == 0.0
    problems = {p["uid"]: p for p in report["problems"]}
    assert [(p["samples"], p["correct"]) for p in problems.values()] == [(32, 32), (32, 0), (4, 0), (4, 0)]
    assert problems["aime24.parquet:0"]["mean_response_tokens"] == answering_model[1] + 1  # + EOS
    assert report["reward_errors"] == 0
    assert report["model_path"] == str(answering_model[0].resolve())
    settings = report["settings"]
    assert settings["k"] is None and settings["temperature"] == 1.0 and settings["top_p"] == 1.0
    assert settings["max_new_tokens"] == 16 and settings["engines"] == 1
    assert settings["engine"] == "attached"
    assert "avg@32 50.00" in captured.out and "pass@4 0.00" in captured.out
    assert "or1 eval: samples scored: 72/72 (100%)" in captured.err


def test_truncated_responses_score_zero_through_the_pipeline(answering_model, engines, aime24):
    model_path, answer_tokens = answering_model
    [record] = load_problems(aime24)[:1]

    async def scenario():
        async with SamplingSession(model_path, engines, reward_workers=1) as session:
            assert prompt_token_ids(session.tokenizer, record)[-1] == \
                session.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
            cut = await session.sample([record], [2], SamplingSettings(max_new_tokens=answer_tokens))
            whole = await session.sample([record], [2], SamplingSettings(max_new_tokens=answer_tokens + 4))
        return cut[0], whole[0]

    cut, whole = asyncio.run(asyncio.wait_for(scenario(), timeout=180))
    # Same text (the whole answer); only the finish reason differs, and OR1 scores a cut one 0.
    assert cut.finish_reasons == ["length", "length"] and cut.response_tokens == [answer_tokens] * 2
    assert cut.scores == [0.0, 0.0] and cut.correct == 0 and cut.truncated == 2
    assert whole.finish_reasons == ["stop", "stop"] and whole.scores == [1.0, 1.0]


def test_estimate_difficulty_writes_the_pass_rates_the_offline_filter_reads(answering_model, engines,
                                                                            aime24, tmp_path, capsys):
    out = tmp_path / "rates.jsonl"
    common = ["--model-path", str(answering_model[0]), "--data", str(aime24), "--n", "2",
              "--max-new-tokens", "16", "--reward-workers", "1", "--out", str(out), *_attach(engines)]
    assert difficulty.main([*common, "--limit", "2"]) == 0, capsys.readouterr().err
    first = out.read_text().splitlines()
    assert sorted(json.loads(line)["uid"] for line in first) == ["aime24.parquet:0", "aime24.parquet:1"]
    # Resume: the rows written stay, only the new prompt is sampled.
    assert difficulty.main([*common, "--limit", "3", "--resume"]) == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    rates = load_pass_rates(out)
    assert rates == {"aime24.parquet:0": (2, 2), "aime24.parquet:1": (0, 2), "aime24.parquet:2": (0, 2)}
    result = filter_by_pass_rate(load_problems(aime24)[:3], rates)
    assert result.kept == [] and result.dropped == {"solved 0/2": 2, "solved 2/2": 1}
    assert "1 prompts to sample (2 already in" in capsys.readouterr().err


def test_engines_that_do_not_start_are_reported(answering_model, aime24, tmp_path, capsys):
    port = free_port()  # nothing listens there
    rc = command.main(["--model-path", str(answering_model[0]), "--data", str(aime24), "--limit", "1",
                       "--k", "1", "--reward-workers", "1", "--engine-url", f"http://127.0.0.1:{port}",
                       "--start-timeout", "1", "--out", str(tmp_path / "r.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"or1 eval: error: rollout engines failed to start: engine on http://127.0.0.1:{port} " \
           "not ready after 1 s" in err
    assert "engine logs" not in err  # an attached engine's log is not ours to point at
    assert not (tmp_path / "r.json").exists()


def test_an_engine_process_that_dies_at_start_is_reported_with_its_log(answering_model, aime24,
                                                                       tmp_path, capsys):
    # A real `or1 serve` process that exits at start: it refuses an option passed through to it.
    rc = command.main(["--model-path", str(answering_model[0]), "--data", str(aime24), "--limit", "1",
                       "--k", "1", "--engine", "cpu", "--engines", "1", "--engine-threads", "1",
                       "--engine-arg=--no-such-option", "--reward-workers", "1", "--start-timeout", "120",
                       "--engine-log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "or1 eval: error: rollout engines failed to start: engine on http://127.0.0.1:" in err
    assert "exited with code 2" in err
    assert "unrecognized arguments: --no-such-option" in err  # the tail of the engine's log
    assert f"engine logs: {tmp_path / 'logs'}" in err
    assert not (tmp_path / "r.json").exists()


def test_engines_stay_healthy_after_the_commands(engines):
    for process in engines:  # the commands attached to them and must not have killed them
        assert process.alive()
        with urllib.request.urlopen(process.url + "/health", timeout=5) as answer:
            assert answer.status == 200
