"""tools/submit_slurm.py: the script it writes, and real jobs on a one-node Slurm cluster.

The cluster (tests/slurm_cluster.py) is Debian's slurmctld/slurmd/munge on this machine; its
tests skip with the reason when it cannot run (not root, no apt-get).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from or1_megatron.cluster.slurm_script import time_limit_seconds
from or1_megatron.config import load_config
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "tools" / "submit_slurm.py"
MODEL_7B = REPO / "configs" / "models" / "deepseek-r1-distill-qwen-7b.json"


def submit(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


# --- the script (no cluster needed) ---------------------------------------------------------

def test_dry_run_prints_a_script_that_passes_everything_through(tmp_path):
    run_dir = tmp_path / "run dir with spaces"
    overrides = ["optim.lr=2e-6", "sync.disk_dir=/tmp/a dir/it's here", 'data.train_files=["x y.parquet"]',
                 f"model.hf_path={MODEL_7B}"]
    done = submit("--config", "configs/or1_7b.yaml", "--nodes", "4", "--gpus-per-node", "8",
                  "--partition", "gpu", "--time", "2-00:00:00", "--dry-run", "--run-dir", str(run_dir),
                  "--max-steps", "7", *overrides)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert not run_dir.exists()  # a dry run writes nothing
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --signal=B:TERM@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f'#SBATCH --output="{run_dir}/slurm/job-%j.out"', f'#SBATCH --chdir="{REPO}"'):
        assert line + "\n" in script, line
    # Ray head on this node, workers on the others, through srun; the job requeues itself
    assert "srun --overlap" in script and "--kill-on-bad-exit=1" in script
    assert "ray_node head --temp-dir" in script and "ray_node worker --address" in script
    assert '--nodes=$((NUM_NODES - 1))' in script and '--exclude="$HEAD_NODE"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert '"ray.address=$ADDRESS"' in script
    # `ray`, `python` and `or1` come from the environment that ran the tool
    assert f"BIN={Path(sys.executable).parent}" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0

    # bash itself reads back exactly the arguments given: quoting survives spaces and quotes
    header = script.split("\nlog() {", 1)[0]
    printed = subprocess.run(["bash", "-c", header + '\nprintf "%s\\n" "${TRAIN_ARGS[@]}"'],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed == ["train", "--config", str(REPO / "configs" / "or1_7b.yaml"), "--run-dir", str(run_dir),
                       "--resume", "auto", "--max-steps", "7", *overrides]
    # and the run directory with spaces reaches the variables the job uses
    rundir = subprocess.run(["bash", "-c", header + '\necho "$LOG_DIR"'], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert rundir == f"{run_dir}/slurm"


def test_cpu_only_script_asks_for_no_gpus(tmp_path):
    done = submit("--config", "configs/demo_cpu.yaml", "--nodes", "2", "--gpus-per-node", "0", "--dry-run",
                  "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --gpus-per-node" not in done.stdout
    assert "GPUS_PER_NODE=0\n" in done.stdout  # the srun steps and Ray nodes ask for no GPUs either


@pytest.mark.parametrize(
    "args, message",
    [(["--nodes", "1", "--gpus-per-node", "8", f"model.hf_path={MODEL_7B}"], "needs 32 GPUs"),
     (["--nodes", "4", "--gpus-per-node", "8", f"model.hf_path={MODEL_7B}", "optim.lrr=1"], "optim.lrr"),
     (["--nodes", "4", "--gpus-per-node", "8", "--time", "5", f"model.hf_path={MODEL_7B}"], "at least 420 s")],
)
def test_submission_refuses_what_cannot_run(tmp_path, args, message):
    done = submit("--config", "configs/or1_7b.yaml", "--run-dir", str(tmp_path / "r"), *args)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "r").exists()


def test_slurm_time_limits_parse():
    assert [time_limit_seconds(t) for t in ("30", "30:15", "2:00:00", "1-0", "1-2:30", "1-02:03:04")] == \
        [1800, 1815, 7200, 86400, 95400, 93784]
    assert time_limit_seconds("UNLIMITED") is None and time_limit_seconds("") is None
    with pytest.raises(ValueError):
        time_limit_seconds("soon")


# --- real jobs ------------------------------------------------------------------------------

def _job_id(stdout: str) -> str:
    return stdout.strip().splitlines()[0]


def _ray_leftovers(job_id: str) -> list[str]:
    """Processes still using the job's node-local Ray directory (/tmp/ray-or1-<job>-<restart>)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/tmp/ray-or1-{job_id}-" in cmdline:
            found.append(cmdline[:200])
    return found


@pytest.mark.slurm
def test_failing_driver_fails_the_job_in_bounded_time(slurm_cluster: SlurmCluster, tmp_path):
    """An override `or1 train` rejects (exit 2) ends the job FAILED within two minutes."""
    run_dir = tmp_path / "failing run"
    started = time.monotonic()
    # --no-check: the submitting host would refuse the override; here the driver must
    done = submit("--config", "configs/demo_cpu.yaml", "--nodes", "1", "--gpus-per-node", "0", "--no-check",
                  "--wait", "--join-timeout", "90", "--run-dir", str(run_dir), "--max-steps", "2",
                  "parallel.world_size=3", env=slurm_cluster.env(), timeout=300)
    elapsed = time.monotonic() - started
    job_id = _job_id(done.stdout)
    job = slurm_cluster.job(job_id)
    log = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    assert done.returncode == 2, log  # --wait exits with the job's status
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", (job, log)
    run_time = time_limit_seconds(job["RunTime"])
    assert run_time is not None and run_time < 120 and elapsed < 130, (job["RunTime"], elapsed)
    assert "driver exited with status 2" in log
    assert "parallel.world_size" in (run_dir / "slurm" / f"driver-{job_id}.log").read_text()
    assert list((run_dir / "slurm").glob(f"ray-head-*-{job_id}.log"))
    assert _ray_leftovers(job_id) == []
    kept = list(Path("/tmp").glob(f"ray-or1-{job_id}-*"))  # Ray's logs of a failed run stay
    assert kept
    for path in kept:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slurm
def test_cpu_demo_trains_two_steps_on_slurm(slurm_cluster: SlurmCluster, tmp_path):
    """The CPU demo, 2 steps, as a one-node job: Ray cluster, driver, outputs, clean exit."""
    run_dir = tmp_path / "demo run"
    # shorter than the demo's defaults: 5 warm-up steps, no held-out evaluation, one checkpoint
    done = submit("--config", "configs/demo_cpu.yaml", "--nodes", "1", "--gpus-per-node", "0", "--wait",
                  "--join-timeout", "120", "--run-dir", str(run_dir), "--max-steps", "2",
                  "warmup.sft_steps=5", "data.eval_every=0", "checkpoint.every_steps=0",
                  env=slurm_cluster.env(), timeout=580)
    job_id = _job_id(done.stdout)
    log = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    assert done.returncode == 0, log + slurm_cluster.logs()
    assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED"
    assert "driver exited with status 0" in log

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [line for line in lines if "reward/mean" in line]
    assert len(trained) == 2 and all(isinstance(line["step"], int) for line in trained)
    assert trained[1]["step"] == trained[0]["step"] + 1
    # the resolved config carries the overrides and the address of the job's Ray head
    config = load_config(run_dir / "config.yaml")
    address = log.split("Ray head at ", 1)[1].split()[0]
    assert config.warmup.sft_steps == 5 and config.data.eval_every == 0
    assert config.ray.address == address
    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    assert checkpoints, "no checkpoint directory"
    # per-node logs, and nothing of the job's Ray left running
    assert list((run_dir / "slurm").glob(f"ray-head-*-{job_id}.log"))
    assert (run_dir / "slurm" / f"driver-{job_id}.log").stat().st_size > 0
    assert _ray_leftovers(job_id) == []
    assert not list(Path("/tmp").glob(f"ray-or1-{job_id}-*"))  # removed after a successful run
