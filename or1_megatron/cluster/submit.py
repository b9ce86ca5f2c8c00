"""`tools/submit_slurm.py`: submit `or1 train` as a multi-node Slurm job (Ray head + workers).

    python tools/submit_slurm.py --config CONFIG --nodes N --gpus-per-node G [--partition P]
        [--time T] [--run-dir DIR] [--max-steps N] [--dry-run] [--wait] [key=value ...]

Validates the config (with the overrides) on the submitting host first, so a bad key fails in a
second instead of after the queue; `--no-check` skips that when this host cannot read what the
config names (e.g. a model on node-local disks). Writes the script to
<run_dir>/slurm/submit-<time>.sbatch and prints the job id; with --dry-run prints the script
and submits nothing; with --wait blocks until the job ends and exits with its status.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from or1_megatron.cluster.slurm_script import SlurmJob, render_sbatch
from or1_megatron.config.loader import default_run_dir, load_config
from or1_megatron.errors import OR1Error


def check_allocation(world_size: int, engine_gpus: int, placement: str, nodes: int, gpus_per_node: int) -> str | None:
    """Why the job's GPUs cannot hold the config's layout, or None (CPU jobs are not checked)."""
    if gpus_per_node == 0:
        return None
    have = nodes * gpus_per_node
    need = max(world_size, engine_gpus) if placement == "colocated" else world_size + engine_gpus
    if need > have:
        return (f"the config needs {need} GPUs (parallel.world_size={world_size}, "
                f"{engine_gpus} engine GPUs, {placement}); {nodes} node(s) x {gpus_per_node} have {have}")
    return None


def build_job(args: argparse.Namespace) -> SlurmJob:
    config_path = Path(args.config).absolute()
    configured_run_dir, ray_cpus = "", 0
    if not args.no_check:
        cfg = load_config(config_path, args.overrides)
        problem = check_allocation(cfg.parallel.world_size, cfg.rollout.engines * cfg.rollout.engine_tp,
                                   cfg.rollout.placement, args.nodes, args.gpus_per_node)
        if problem:
            raise OR1Error(f"{config_path}: {problem}")
        configured_run_dir, ray_cpus = cfg.run.run_dir, cfg.ray.num_cpus
    elif not config_path.is_file():
        raise OR1Error(f"{config_path}: no such config file")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config_path, configured_run_dir)
    bin_dir = Path(sys.executable).parent
    for tool in ("or1", "ray"):
        if not (bin_dir / tool).exists():
            raise OR1Error(f"{bin_dir / tool} not found: the job runs `or1` and `ray` from the "
                           "environment of this python (pip install -e . installs both)")
    return SlurmJob(
        config=config_path, run_dir=run_dir.absolute(), workdir=Path.cwd(), bin_dir=bin_dir,
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, job_name=f"or1-{config_path.stem}",
        partition=args.partition, time=args.time, max_steps=args.max_steps,
        overrides=tuple(args.overrides), ray_cpus_per_node=ray_cpus,
        signal_lead_s=args.signal_lead, join_timeout_s=args.join_timeout,
        sbatch_args=tuple(args.sbatch),
    )


# Job states after which a job will not run again (a REQUEUED job goes back to PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, RunTime, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                         env=env, timeout=60)
    if out.returncode != 0:
        raise OR1Error(f"scontrol show job {job_id}: {out.stderr.strip()}")
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def exit_status(info: dict[str, str]) -> int:
    """The shell-style status of a finished job: its script's exit code, 128+N for signal N."""
    code, _, sig = info.get("ExitCode", "1:0").partition(":")
    if int(code):
        return int(code)
    if int(sig or 0):
        return 128 + int(sig)
    return 0 if info["JobState"] == "COMPLETED" else 1


def wait_for_job(job_id: str, poll_s: float = 2.0) -> int:
    """Poll until the job is final (through requeues); its exit status. Polls faster than
    `sbatch --wait`, whose back-off adds up to half a minute after the job ends."""
    while True:
        info = job_info(job_id)
        if info["JobState"] in FINAL_STATES:
            return exit_status(info)
        time.sleep(poll_s)


def submit(script_path: Path, wait: bool) -> int:
    """sbatch the script and print the job id; with `wait`, the job's exit status."""
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        print(f"submit_slurm: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"
    print(job_id, flush=True)
    return wait_for_job(job_id) if wait else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/submit_slurm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="0: a CPU-only job")
    parser.add_argument("--partition", default="")
    parser.add_argument("--time", default="", help="Slurm time limit, e.g. 2-00:00:00")
    parser.add_argument("--run-dir", default="", help="default: run.run_dir, else runs/<config name>")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job; exit with its status")
    parser.add_argument("--no-check", action="store_true", help="do not validate the config here")
    parser.add_argument("--signal-lead", type=int, default=120,
                        help="seconds before the time limit at which the driver checkpoints")
    parser.add_argument("--join-timeout", type=int, default=300,
                        help="seconds for the Ray head to start and every node to join")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="extra #SBATCH option, e.g. --sbatch=--account=abc (repeatable)")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to or1 train")
    args = parser.parse_intermixed_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--nodes and --max-steps must be >= 1, --gpus-per-node >= 0")
    try:
        job = build_job(args)
    except (OR1Error, ValueError) as exc:
        print(f"submit_slurm: error: {exc}", file=sys.stderr)
        return 2
    script = render_sbatch(job)
    if args.dry_run:
        print(script, end="")
        return 0
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / f"submit-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    return submit(path, args.wait)
