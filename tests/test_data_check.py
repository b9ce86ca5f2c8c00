"""`or1 data check` on files in Skywork-OR1-RL-Data's own schema: every malformed row named, rows
per source and ability, the model_difficulty histogram, prompt lengths under the chat template,
and what the config's filters keep (the same count `or1 train`'s data loading keeps)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from or1_megatron.data.filters import prompt_tokens

ROOT = Path(__file__).resolve().parents[1]
MODEL = "DeepSeek-R1-Distill-Qwen-7B"


def _row(index, ability, solved, content, source=None):
    if ability == "math":
        truth = json.dumps([str(index)])
    else:
        truth = json.dumps({"inputs": ["1\n"], "outputs": [f"{index}\n"]})
    return {"data_source": source or f"train-{ability}-{'olympiads' if ability == 'math' else 'leetcode'}",
            "ability": ability, "prompt": [{"role": "user", "content": content}],
            "reward_model": {"ground_truth": truth, "style": "rule"},
            "extra_info": {"index": index, "uid": f"{ability}-{index}",
                           "model_difficulty": {MODEL: solved, "DeepSeek-R1-Distill-Qwen-32B": 8}}}


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    """A math and a code parquet: solved counts spanning 0..N, one prompt far longer than the
    others, and two malformed rows (no prompt; an unjudgeable assert test)."""
    root = tmp_path_factory.mktemp("data")
    math = [_row(i, "math", solved, f"What is {i} plus {i}?") for i, solved in enumerate([0, 3, 3, 16, 7, 12])]
    math.append(_row(6, "math", 5, "Add these numbers: " + " + ".join(["12345"] * 60)))
    math.append({**_row(7, "math", 2, "x"), "prompt": None})
    code = [_row(i, "code", solved, f"Print {i}.", "train-code-taco") for i, solved in enumerate([8, 1, 4])]
    broken = _row(3, "code", 4, "Loop.")
    broken["reward_model"]["ground_truth"] = json.dumps({
        "test_code": "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == i\n",
        "entry_point": "f", "import_prefix": ""})
    code.append(broken)
    paths = []
    for name, rows in (("math.parquet", math), ("code.parquet", code)):
        # pyarrow cannot hold None for a list column next to lists in from_pylist: one table each.
        pq.write_table(pa.Table.from_pylist(rows), root / name)
        paths.append(root / name)
    from or1_megatron.data.tokenizer import arithmetic_corpus, build_tokenizer
    from or1_megatron.tiny_model import make_tiny_qwen2

    build_tokenizer(root / "model", arithmetic_corpus(200), vocab_size=300)
    make_tiny_qwen2(root / "model", vocab_size=512)  # a config's model.hf_path must be a model
    return paths, root / "model"


def _check(*args):
    proc = subprocess.run([sys.executable, "-m", "or1_megatron.cli", "data", "check", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc


def test_report_on_skywork_schema_files(fixture_files, tmp_path):
    (math, code), tokenizer = fixture_files
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{hf_path: /nowhere}}\nbatch: {{max_prompt_length: 100, max_response_length: 300}}\n"
                      f"data: {{train_files: [{math}, {code}], offline_filter_model: {MODEL}}}\n")
    proc = _check("--config", config, f"model.hf_path={tokenizer}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # every malformed row, by file and row
    assert f"{math}: 8 rows, 7 loaded, 1 malformed" in out
    assert "  row 7: missing field 'prompt'" in out
    assert f"{code}: 4 rows, 3 loaded, 1 malformed" in out
    assert "  row 3: reward_model.ground_truth: test_code check(): only assert statements" in out
    # rows per source and ability
    assert re.search(r"^train-code-taco +code +3$", out, re.MULTILINE)
    assert re.search(r"^train-math-olympiads +math +7$", out, re.MULTILINE)
    # model_difficulty: solved k of 16 (math), of 8 (code)
    assert "  math (N=16): 0:1 1:0 2:0 3:2 4:0 5:1 6:0 7:1 " in out and " 12:1 " in out and " 16:1 |" in out
    assert "  code (N=8): 0:0 1:1 2:0 3:0 4:1 5:0 6:0 7:0 8:1 | no value: 0" in out
    # prompt lengths under the chat template, and the filters in the trainer's order
    assert "longer than max_prompt_length=100: 1" in out
    assert f"model_difficulty[{MODEL}] solved neither 0 nor N: kept 7 of 10 (dropped: 1 solved " \
           "0/16, 1 solved 16/16, 1 solved 8/8)" in out
    assert "prompt length <= 100 tokens: kept 6 of 7 (dropped: 1 longer than 100 tokens)" in out
    assert "would remain: 6 prompts (2 code, 4 math)" in out
    assert "data.on_error=raise: or1 train stops at the first malformed row" in out
    # the trainer's own data loading keeps the same prompts
    from transformers import AutoTokenizer

    from or1_megatron.config import load_config
    from or1_megatron.controller.data import load_training_data

    run_config = load_config(config, [f"model.hf_path={tokenizer}", "data.on_error=skip"])
    kept = load_training_data(run_config, AutoTokenizer.from_pretrained(tokenizer)).train
    assert len(kept) == 6


def test_the_lengths_are_the_trainers_and_bad_arguments_are_named(fixture_files, tmp_path):
    (math, _), tokenizer = fixture_files
    from transformers import AutoTokenizer

    from or1_megatron.data.loaders import load_problems

    records = load_problems(math, on_error="skip")
    lengths = sorted(prompt_tokens(r, AutoTokenizer.from_pretrained(tokenizer)) for r in records)
    proc = _check(math, "--tokenizer", tokenizer)
    assert proc.returncode == 0, proc.stderr
    assert f"min {lengths[0]}, p50 {lengths[len(lengths) // 2]}" in proc.stdout
    assert f"max {lengths[-1]}" in proc.stdout
    assert "would remain: 7 prompts (7 math)" in proc.stdout  # no filter configured
    missing = _check(tmp_path / "nope.parquet")
    assert missing.returncode == 2 and "nope.parquet: no such file" in missing.stderr
    assert _check().returncode == 2
