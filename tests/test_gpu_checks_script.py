"""scripts/gpu_checks.sh is run rarely, on a borrowed GPU, with minutes to spare: its dry run here
checks that every step is there, that the files it runs parse, that the GPU demo config
validates and that its GPU tests are collected."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["kernel_tests", "profile_kernels", "profile_kernels_32b", "bench_1p5b_none", "bench_0p5b_none",
         "bench_1p5b_selective", "bench_1p5b_full", "bench_0p5b_full", "or1_check", "policy_tests",
         "convert", "bench_sync", "demo_gpu"]


def test_the_gpu_check_script_dry_runs_every_step(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = re.findall(r"^RESULT step=(\w+) status=(\w+)", done.stdout, re.M)
    assert results == [(step, "dry_run") for step in STEPS]
    for step in STEPS:  # each step's file ends with its machine-readable line
        assert (tmp_path / f"{step}.txt").read_text().splitlines()[-1].startswith(f"RESULT step={step}")
    assert "rollout:" in (tmp_path / "demo_gpu_config.txt").read_text()


def test_steps_past_the_budget_are_skipped_not_started(tmp_path):
    # BUDGET_S=0: every step would start past the budget, so none runs (none needs a GPU here).
    env = {**os.environ, "BUDGET_S": "0", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    results = re.findall(r"^RESULT step=(\w+) status=(\w+) seconds=0 \(past BUDGET_S=0\)", done.stdout, re.M)
    assert results == [(step, "skipped") for step in STEPS], done.stdout + done.stderr
