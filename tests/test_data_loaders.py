"""Loaders read the real data files into one problem record; bad rows are named or counted."""
import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from or1_megatron.data.loaders import MATH_INSTRUCTION, load_many, load_problems
from or1_megatron.data.records import DataError
from or1_megatron.rewards import parse_code_tests

FILES = {
    "eval/aime24.parquet": (30, "math"),
    "eval/aime25.parquet": (30, "math"),
    "train/aime_1983_2023.json": (975, "math"),
    "eval/math500.json": (500, "math"),
    "code/leetcodedataset_v0.3.1_test_part1.jsonl.gz": (128, "code"),
    "code/leetcodedataset_v0.3.1_test_part2.jsonl.gz": (100, "code"),
    "code/leetcode_functional.json": (200, "code"),
    "code/livecodebench_public_part1.json": (150, "code"),
    "code/livecodebench_public_part2.json": (129, "code"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_shared_file_loads_completely(shared_data, name):
    count, ability = FILES[name]
    records = load_problems(shared_data / name)
    assert len(records) == count
    assert {r.ability for r in records} == {ability}
    assert len({r.uid for r in records}) == count
    for record in records:
        assert record.prompt[-1]["role"] == "user" and record.question.strip()
        if ability == "code":
            parse_code_tests(record.ground_truth)
        else:
            assert str(record.ground_truth).strip()


def test_verl_rows_keep_their_fields(shared_data):
    record = load_problems(shared_data / "eval" / "aime24.parquet")[0]
    assert record.data_source == "test-math-aime24"
    assert record.ground_truth == "204"
    assert record.extra_info["split"] == "test"
    assert record.question.endswith(MATH_INSTRUCTION)


def test_livecodebench_rows_become_or1_schemas(shared_data):
    records = load_many([shared_data / "code" / "livecodebench_public_part1.json",
                         shared_data / "code" / "livecodebench_public_part2.json"])
    kinds = {parse_code_tests(r.ground_truth).kind for r in records}
    assert kinds == {"stdin", "functional"}
    functional = next(r for r in records if "fn_name" in r.ground_truth)
    assert "```python" in functional.question


def _skywork_rows():
    # Skywork-OR1-RL-Data's schema: verl columns, JSON-string code ground truth, model_difficulty.
    difficulty = {"DeepSeek-R1-Distill-Qwen-7B": 5, "DeepSeek-R1-Distill-Qwen-32B": 16}
    math = {"data_source": "train-math-numinamath1.5_olympiads", "ability": "math",
            "prompt": [{"role": "user", "content": "What is 1+1?"}],
            "reward_model": {"ground_truth": '["2"]', "style": "rule"},
            "extra_info": {"index": 0, "model_difficulty": difficulty}}
    code = {"data_source": "train-code-leetcode-Medium", "ability": "code",
            "prompt": [{"role": "user", "content": "Double the input."}],
            "reward_model": {"ground_truth": json.dumps({"inputs": ["2\n"], "outputs": ["4\n"]}),
                             "style": "rule"},
            "extra_info": {"index": 1, "model_difficulty": difficulty}}
    return [math, code]


def test_skywork_parquet_with_model_difficulty(tmp_path):
    path = tmp_path / "skywork.parquet"
    pq.write_table(pa.Table.from_pylist(_skywork_rows()), path)
    math, code = load_problems(path)
    assert math.extra_info["model_difficulty"]["DeepSeek-R1-Distill-Qwen-7B"] == 5
    assert code.ability == "code" and parse_code_tests(code.ground_truth).kind == "stdin"
    from or1_megatron.rewards import compute_score
    assert compute_score(solution_str="<think>x</think> \\boxed{2}", **math.reward_kwargs()) == 1.0


def test_malformed_row_names_file_row_and_field(tmp_path):
    rows = _skywork_rows()
    del rows[1]["reward_model"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: missing field 'reward_model'"):
        load_problems(path)


def test_malformed_values_are_row_errors_too(tmp_path):
    rows = _skywork_rows()
    rows[0]["extra_info"] = "not a mapping"  # a converter's dict() fails, not its own checks
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 0: ValueError"):
        load_problems(path)
    assert len(load_problems(path, on_error="skip")) == len(rows) - 1


def test_non_numeric_model_difficulty_is_named(tmp_path):
    from or1_megatron.data.filters import filter_by_model_difficulty

    rows = _skywork_rows()
    rows[0]["extra_info"]["model_difficulty"] = {"R1-7B": "hard"}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"model_difficulty\['R1-7B'\]='hard'"):
        filter_by_model_difficulty(load_problems(path), "R1-7B")


def test_bad_code_ground_truth_is_a_row_error(tmp_path):
    rows = _skywork_rows()
    rows[1]["reward_model"]["ground_truth"] = json.dumps({"tests": []})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad\.json: row 1: reward_model\.ground_truth: .*no schema"):
        load_problems(path)


def test_skipping_counts_and_logs_each_reason(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl.gz"
    lines = [json.dumps({"problem": "1+1?", "answer": "2"}), "{not json",
             json.dumps({"problem": "2+2?"}), json.dumps({"problem": "3+3?", "answer": "6"}), "[1, 2]"]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        records = load_problems(path, on_error="skip")
    assert [r.ground_truth for r in records] == ["2", "6"]
    assert "mixed.jsonl.gz: skipped 3 of 5 rows" in caplog.text
    assert "missing field 'answer'" in caplog.text and "invalid JSON line" in caplog.text


def test_unknown_schema_and_file_type(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"question": "?", "label": 1}]))
    with pytest.raises(DataError, match=r"odd\.json: row 0: no known schema has the keys \['label', 'question'\]"):
        load_problems(path)
    (tmp_path / "data.csv").write_text("problem,answer\n1+1,2\n")
    with pytest.raises(DataError, match=r"data\.csv: unknown data file type"):
        load_problems(tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"missing\.json: no such file"):
        load_problems(tmp_path / "missing.json")


def test_records_round_trip_through_verl_parquet(shared_data, tmp_path):
    records = (load_problems(shared_data / "eval" / "aime25.parquet")[:3]
               + load_problems(shared_data / "code" / "livecodebench_public_part1.json")[:3])
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([r.to_verl_row() for r in records]), path)
    loaded = load_problems(path)
    assert [r.uid for r in loaded] == [r.uid for r in records]
    assert [r.ability for r in loaded] == ["math"] * 3 + ["code"] * 3
    for before, after in zip(records, loaded, strict=True):
        assert after.prompt == before.prompt
        if before.ability == "code":
            assert parse_code_tests(after.ground_truth) == parse_code_tests(before.ground_truth)
        else:
            assert after.ground_truth == before.ground_truth
