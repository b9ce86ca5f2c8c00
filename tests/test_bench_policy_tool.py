"""tools/bench_policy.py runs a real (tiny) policy train step on CPU and prints its figures.

Only the format, the formulas' inputs and bad input are checked: throughput and MFU are
measurements, not test outcomes (the GPU figures go into the issue notes)."""
import json
import re
import subprocess
import sys
from pathlib import Path

from or1_megatron.tiny_model import tiny_qwen2_dict

REPO = Path(__file__).resolve().parents[1]
TOOL = str(REPO / "tools" / "bench_policy.py")


def test_bench_prints_throughput_mfu_and_the_planner_prediction(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_qwen2_dict(hidden_size=64, intermediate_size=160, vocab_size=500,
                                                 max_position_embeddings=1024)))
    cmd = [sys.executable, TOOL, "--model", str(config), "--micro-batch-tokens", "128", "--micro-batches", "2",
           "--sequence-length", "64", "--steps", "1", "--recompute", "full"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 x 128 tokens in sequences of 64; recompute full; fp32 on cpu" in out
    assert "predicted by the planner (GiB): weights (bf16)" in out
    assert re.search(r"activations of one micro-batch's forward: measured [\d.e+-]+ GiB", out)
    result = dict(item.split("=", 1) for item in out.strip().splitlines()[-1].split()[1:])
    assert result["tokens"] == "256" and result["recompute"] == "full"
    assert float(result["tokens_per_s"]) > 0 and 0 < float(result["mfu"]) < 1.5
    assert float(result["predicted_gib"]) > 0 and float(result["peak_gib"]) > 0
    assert "activations_gib" in result and "predicted_activations_gib" in result
    assert re.search(r"MFU [\d.]+: 3 x [\d.e+-]+ GFLOP/token x 256 tokens", out)


def test_unknown_model_names_the_known_ones():
    proc = subprocess.run([sys.executable, TOOL, "--model", "qwen9-1t", "--micro-batch-tokens", "64"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--model 'qwen9-1t': no such config.json or configs/models name" in proc.stderr
    assert "qwen2.5-0.5b, qwen2.5-1.5b" in proc.stderr
