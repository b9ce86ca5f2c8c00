"""`or1 train` end to end on CPU: Ray, a TP=2 Megatron policy, one CPU engine, verified sync.

A short run of the demo config must train every step (a real update the engine must then
reproduce: sync verification is on), write the per-step metrics, TensorBoard events and
checkpoints; and a run killed with SIGKILL after a checkpoint, then resumed with --resume auto,
must end with exactly the metrics of the run that never stopped.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.run_metrics import same_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# Small and fast; every group is trained (no rejection: the warm-up is too short for rewards
# to differ within a group) with an entropy bonus, so each step changes the weights.
OVERRIDES = [
    "warmup.sft_steps=4", "data.arithmetic.train_problems=200", "data.arithmetic.heldout_problems=6",
    "data.eval_every=2", "data.eval_samples=1", "batch.rollout_prompts=4",
    "batch.mini_batch_prompts=2", "batch.group_size=4", f"stages.0.steps={STEPS}",
    "checkpoint.every_steps=2", "checkpoint.keep=3", "algo.drop_uniform_groups=false",
    "algo.entropy.coef_init=0.01", "algo.entropy.target=100", "sync.bucket_mb=0.05",
    "checkpoint.hf_every=2", "checkpoint.hf_keep=2",
]


# algo.mode: the paper's sequential loop, and the overlapped one (the engines generate the next
# batch with the weights of the step before while the trainer trains) with truncated IS.
MODES = {
    "sync": [],
    "one_step_off": ["algo.mode=one_step_off", "rollout.placement=disaggregated",
                     "algo.is_correction=tis", "algo.is_cap=2.0"],
}


def train_command(run_dir, mode="sync"):
    return [sys.executable, "-m", "or1_megatron.cli", "train", "--config",
            str(ROOT / "configs" / "demo_cpu.yaml"), "--run-dir", str(run_dir), *OVERRIDES,
            *MODES[mode]]


def run_to_end(run_dir, timeout=400, mode="sync"):
    proc = subprocess.run(train_command(run_dir, mode), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=sorted(MODES))
def uninterrupted(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"train-{request.param}") / "run"
    proc = run_to_end(run_dir, mode=request.param)
    return run_dir, proc, request.param


def test_a_short_run_trains_syncs_and_records_every_step(uninterrupted):
    run_dir, proc, mode = uninterrupted
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(STEPS + 1))  # step 0: after the warm-up
    for r in records[1:]:
        assert r["stage"] == 0 and 0.0 <= r["reward/mean"] <= 1.0
        assert r["actor/sgd_steps"] == 2 and r["actor/train_tokens"] > 0  # N_SGD = 4 / 2
        assert r["actor/grad_norm"] > 0 and r["time/sync_s"] > 0 and r["time/step_s"] > 0
    assert all("eval/heldout_accuracy" in records[s] for s in (0, 2, 4))
    assert "eval/heldout_accuracy" not in records[1]
    # the console shows a line per step
    assert [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("step ")] == \
        [f"step {s}/{STEPS}" for s in range(STEPS + 1)]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["step_0000000", "step_0000002", "step_0000004"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "base_model" / "config.json").is_file()
    log = (run_dir / "train.log").read_text()
    assert "restarted" not in log  # every sync verified against the engine on the first try
    # one_step_off: every batch after the first was generated during the step before, with
    # weights a step older than the trainer's; the mismatch is measured and corrected
    expected_lag = [0.0] + [1.0 if mode == "one_step_off" else 0.0] * (STEPS - 1)
    assert [r["rollout/off_policy_steps"] for r in records[1:]] == expected_lag
    if mode == "one_step_off":
        assert all(r["mismatch/abs_log_ratio_mean"] > 0 for r in records[1:])
        assert all(0 <= r["mismatch/capped_fraction"] <= 1 for r in records[1:])
        assert sorted(p.name for p in (run_dir / "pending").iterdir()) == \
            ["batch_0000003.json"]  # saved with the step-2 checkpoint (none before step 1, none at the end)
    else:
        assert "mismatch/abs_log_ratio_mean" not in records[1]


def _score_checkpoint(rank, world, hf_dir, checkpoint, sequences):
    from or1_megatron.policy.worker import PolicyWorker
    from tests.policy_support import policy_config

    config = policy_config(hf_dir, **{"model.megatron_checkpoint": str(checkpoint),
                                      "model.make_vocab_size_divisible_by": 8})  # the demo's
    return [r.logprob for r in PolicyWorker(config).compute_logprobs(sequences)]


def test_hf_exports_equal_the_converter_and_score_like_the_trainer(uninterrupted, tmp_path):
    """checkpoint.hf_every=2, hf_keep=2: steps 0, 2 and 4 were exported, 2 and 4 kept. The export
    of step 4 is, file for file and byte for byte, what `or1 convert mcore-to-hf` makes of that
    step's checkpoint; it loads in transformers and scores sequences as the Megatron policy
    restored from the checkpoint does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from or1_megatron.distributed.fork_launcher import run_forked
    from or1_megatron.policy.oracle import transformers_oracle
    from tests.policy_support import random_sequences

    run_dir, proc, _ = uninterrupted
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["step_0000002", "step_0000004"]
    exported, checkpoint = run_dir / "hf" / "step_0000004", run_dir / "checkpoints" / "step_0000004"
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "or1_megatron.cli", "convert", "mcore-to-hf", "--mcore-dir",
                    str(checkpoint), "--out", str(converted), "--dtype", "fp32"],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted(p.name for p in converted.iterdir())
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(names)
    for name in names:
        assert (exported / name).read_bytes() == (converted / name).read_bytes(), name
    assert "hf export: " in (run_dir / "train.log").read_text()

    AutoTokenizer.from_pretrained(exported)
    assert next(AutoModelForCausalLM.from_pretrained(exported).parameters()).dtype == torch.float32
    sequences = random_sequences(256, (9, 14, 5))
    megatron = run_forked(_score_checkpoint, 1, run_dir / "base_model", checkpoint, sequences)[0]
    for got, expected in zip(megatron, transformers_oracle(exported, sequences), strict=True):
        torch.testing.assert_close(got.double(), expected["logprob"], atol=1e-4, rtol=0)


def test_killed_run_resumes_with_identical_metrics(uninterrupted, tmp_path):
    reference_dir, _, mode = uninterrupted
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(run_dir, mode), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    try:
        # Kill -9 once the step-2 checkpoint exists and step 3 is under way.
        while not any(r["step"] >= 3 for r in _metrics_if_any(run_dir)):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no step 3 within 400 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    checkpoint = run_dir / "checkpoints" / "step_0000002"
    assert checkpoint.is_dir()
    killed_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    before_checkpoint = [line for line in killed_lines if json.loads(line)["step"] <= 2]
    assert len(before_checkpoint) == 3
    proc = run_to_end(run_dir, mode=mode)  # --resume auto is the default
    # A resume happened (a seeded rerun from step 0 would reach the same metrics): the run names
    # the checkpoint, does not warm up again, and keeps the killed run's rows up to the
    # checkpoint byte for byte (their wall-clock fields would differ in a rerun).
    assert f"resuming from {checkpoint}" in proc.stderr
    assert "warm-up step" not in proc.stderr
    assert "training 4 steps (from step 2)" in proc.stderr
    resumed_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert resumed_lines[:3] == before_checkpoint
    resumed, reference = metrics(run_dir), metrics(reference_dir)
    assert [r["step"] for r in resumed] == list(range(STEPS + 1))
    for ours, theirs in zip(resumed, reference, strict=True):
        same_metrics(ours, theirs)


def _metrics_if_any(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_disaggregated_engines_get_bundles_of_their_own(tmp_path):
    # Engines in their own placement-group bundles (no memory hand-back): one step, verified sync.
    run_dir = tmp_path / "run"
    proc = subprocess.run(train_command(run_dir) + ["rollout.placement=disaggregated", "run.max_steps=1",
                                                    "data.eval_every=0", "checkpoint.every_steps=0"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1] and records[1]["actor/train_tokens"] > 0
