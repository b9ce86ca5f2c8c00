"""Evaluation arithmetic against hand-computed values, the pass-rate file format, and the errors
`or1 eval` / estimate_difficulty give for bad input before any engine starts."""
from __future__ import annotations

import json

import pytest

from or1_megatron.data.filters import filter_by_pass_rate, format_pass_rate, load_pass_rates
from or1_megatron.data.records import ProblemRecord
from or1_megatron.eval import command, difficulty
from or1_megatron.eval.metrics import (
    FALLBACK_K, ProblemCount, default_k, format_table, pass_at_k, source_metrics,
)
from or1_megatron.eval.sampling import SamplingError, SamplingSettings, samples_per_problem


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 2, 1 - 3 / 10),     # 1 - C(3,2)/C(5,2)
    (5, 2, 1, 2 / 5),          # pass@1 is the fraction correct
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
    (4, 0, 4, 0.0),
    (4, 1, 4, 1.0),            # with n = k: solved at least once
    (3, 2, 2, 1.0),            # n - c < k: every pair holds a correct sample
    (32, 32, 32, 1.0),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 5, 2), (4, 1, 5), (4, 1, 0), (4, -1, 2)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_source_metrics_on_a_fixed_correctness_matrix():
    counts = [ProblemCount("aime", 4, 4, truncated=1), ProblemCount("lcb", 2, 1),
              ProblemCount("aime", 4, 2), ProblemCount("aime", 4, 0, truncated=3)]
    metrics = source_metrics(counts)
    assert list(metrics) == ["aime", "lcb"]  # first-seen order
    aime = metrics["aime"]
    assert aime["problems"] == 3 and aime["k"] == 4
    assert aime["avg@k"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert aime["pass@k"] == pytest.approx((1 + 1 + 0) / 3)
    assert aime["truncated"] == pytest.approx(4 / 12)
    assert metrics["lcb"] == {"problems": 1, "k": 2, "avg@k": 0.5, "pass@k": 1.0, "truncated": 0.0}
    table = format_table(metrics)
    assert "avg@4 50.00" in table and "pass@4 66.67" in table and "33.3%" in table
    assert table.splitlines()[0].split()[:2] == ["data", "source"]


def test_default_k_follows_the_paper_per_data_source_and_explicit_k_wins():
    assert default_k("test-math-aime24") == 32 and default_k("AIME2025") == 32
    assert default_k("livecodebench") == 4
    assert default_k("math") == FALLBACK_K
    records = [ProblemRecord(f"u{i}", source, "math", [{"role": "user", "content": "q"}], "1")
               for i, source in enumerate(["test-math-aime25", "livecodebench", "math500"])]
    assert samples_per_problem(records, None, lambda r: default_k(r.data_source)) == [32, 4, FALLBACK_K]
    assert samples_per_problem(records, 2, lambda r: default_k(r.data_source)) == [2, 2, 2]
    with pytest.raises(SamplingError, match="problem u0: samples per problem must be >= 1"):
        samples_per_problem(records, 0, lambda r: 1)


def test_sampling_seeds_depend_on_problem_and_sample_not_on_run_order():
    settings = SamplingSettings(max_new_tokens=8)
    a = settings.sampling_params("aime24.parquet:3", 0, [1])
    assert a == settings.sampling_params("aime24.parquet:3", 0, [1])
    assert a["temperature"] == 1.0 and a["top_p"] == 1.0 and a["stop_token_ids"] == [1]
    seeds = {settings.sampling_params(uid, j, [])["sampling_seed"] for uid in ("x", "y") for j in range(3)}
    assert len(seeds) == 6 and all(0 <= s < 2 ** 56 for s in seeds)
    assert SamplingSettings(8, seed=1).sampling_params("x", 0, [])["sampling_seed"] not in seeds
    with pytest.raises(SamplingError, match="top_p"):
        SamplingSettings(8, top_p=0.0)


def test_pass_rate_lines_round_trip_through_the_offline_filter(tmp_path):
    path = tmp_path / "rates.jsonl"
    path.write_text(format_pass_rate("a", 0, 16) + format_pass_rate("b", 5, 16)
                    + format_pass_rate("c", 8, 8), encoding="utf-8")
    assert load_pass_rates(path) == {"a": (0, 16), "b": (5, 16), "c": (8, 8)}
    records = [ProblemRecord(uid, "math", "math", [{"role": "user", "content": "q"}], "1")
               for uid in "abcd"]
    result = filter_by_pass_rate(records, load_pass_rates(path))
    assert [r.uid for r in result.kept] == ["b"]
    assert result.dropped == {"solved 0/16": 1, "solved 8/8": 1, "no measured pass rate": 1}
    with pytest.raises(ValueError, match="solved=3 is not within 0..samples=2"):
        format_pass_rate("x", 3, 2)


@pytest.fixture
def model_dir_without_weights(tmp_path):
    """Enough of a model directory to get past argument checks (no engine is started)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_missing_data_file_is_named(tmp_path, model_dir_without_weights, capsys):
    missing = tmp_path / "nope.parquet"
    rc = command.main(["--model-path", str(model_dir_without_weights), "--data", str(missing)])
    assert rc == 2
    assert f"or1 eval: error: {missing}: no such file" in capsys.readouterr().err


def test_unknown_file_type_and_bad_row_are_named(tmp_path, model_dir_without_weights, capsys):
    csv = tmp_path / "problems.csv"
    csv.write_text("problem,answer\n")
    assert command.main(["--model-path", str(model_dir_without_weights), "--data", str(csv)]) == 2
    assert f"{csv}: unknown data file type" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"problem": "2+2?", "answer": ""}) + "\n")
    assert command.main(["--model-path", str(model_dir_without_weights), "--data", str(rows)]) == 2
    assert f"{rows}: row 1: missing field 'answer'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the allowed formats
        command.main(["--model-path", "m", "--data", str(rows), "--format", "csv"])
    assert "invalid choice: 'csv'" in capsys.readouterr().err


def test_duplicate_uids_across_files_are_refused(tmp_path, model_dir_without_weights, capsys):
    row = {"data_source": "s", "prompt": [{"role": "user", "content": "q"}], "ability": "math",
           "reward_model": {"ground_truth": "1"}, "extra_info": {"uid": "same"}}
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for f in files:
        f.write_text(json.dumps(row) + "\n")
    assert command.main(["--model-path", str(model_dir_without_weights), "--data", *map(str, files)]) == 2
    assert f"{files[1]}: uid 'same' is also in {files[0]}" in capsys.readouterr().err


def test_model_directory_without_config_is_named(tmp_path, shared_data, capsys):
    rc = command.main(["--model-path", str(tmp_path), "--data",
                       str(shared_data / "eval" / "aime24.parquet"), "--limit", "1"])
    assert rc == 2
    assert f"{tmp_path}: not a Hugging Face model directory (no config.json)" in capsys.readouterr().err


def test_estimate_difficulty_refuses_to_overwrite_without_resume(tmp_path, shared_data, capsys):
    out = tmp_path / "rates.jsonl"
    out.write_text(format_pass_rate("x", 1, 2))
    rc = difficulty.main(["--model-path", str(tmp_path), "--data",
                          str(shared_data / "eval" / "aime24.parquet"), "--out", str(out)])
    assert rc == 2
    assert f"{out} exists; pass --resume" in capsys.readouterr().err


def test_model_directory_without_tokenizer_or_weights_is_named(model_dir_without_weights, shared_data,
                                                               capsys):
    from or1_megatron.data.tokenizer import arithmetic_corpus, build_tokenizer

    argv = ["--model-path", str(model_dir_without_weights), "--data",
            str(shared_data / "eval" / "aime24.parquet"), "--limit", "1", "--engine", "cpu"]
    assert command.main(argv) == 2
    assert f"{model_dir_without_weights}: cannot load its tokenizer" in capsys.readouterr().err
    build_tokenizer(model_dir_without_weights, arithmetic_corpus(20), vocab_size=300)
    assert command.main(argv) == 2  # refused before any engine starts
    assert (f"{model_dir_without_weights}: no model weights (*.safetensors or pytorch_model*.bin)"
            in capsys.readouterr().err)
