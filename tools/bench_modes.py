"""algo.mode side by side on the CPU demo: held-out accuracy and wall-clock per step of `sync`
and `one_step_off`, both with disaggregated engines (the placement one_step_off needs), in one
run of this script, one after the other.

    python tools/bench_modes.py [--steps N] [--out DIR] [key=value ...]

Prints, per mode: the final held-out accuracy, the mean step time over the RL steps and its
phases (rollout waited for, old log-probs, train, the wait for a prefetched batch, sync), then
the ratio of the mean step times. Extra key=value arguments go to both runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "sync": ["rollout.placement=disaggregated"],
    "one_step_off": ["rollout.placement=disaggregated", "algo.mode=one_step_off", "algo.is_correction=tis"],
}
PHASES = ("rollout", "old_logprob", "train", "rollout_wait", "sync", "step")


def run_mode(mode: str, run_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "or1_megatron.cli", "train", "--config",
               str(ROOT / "configs" / "demo_cpu.yaml"), "--run-dir", str(run_dir), "--resume", "never",
               *MODES[mode], *extra]
    print(f"[{mode}] {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["step"] > 0]
    accuracy = [r["eval/heldout_accuracy"] for r in records if "eval/heldout_accuracy" in r]
    return {"wall_s": time.perf_counter() - start, "final_accuracy": accuracy[-1],
            "first_accuracy": accuracy[0],
            **{phase: statistics.mean(r.get(f"time/{phase}_s", 0.0) for r in rl) for phase in PHASES}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="RL steps of each run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_modes")
    args, extra = parser.parse_known_args(argv)
    extra = [f"stages.0.steps={args.steps}", *extra]
    results = {mode: run_mode(mode, args.out / mode, extra) for mode in MODES}
    print(f"\n{'mode':<13} {'heldout':>15} " + " ".join(f"{p + '_s':>14}" for p in PHASES) + f" {'wall_s':>8}")
    for mode, r in results.items():
        print(f"{mode:<13} {r['first_accuracy']:.3f} -> {r['final_accuracy']:.3f} "
              + " ".join(f"{r[p]:>14.3f}" for p in PHASES) + f" {r['wall_s']:>8.1f}")
    sync, off = results["sync"], results["one_step_off"]
    print(f"\none_step_off / sync mean step time: {off['step'] / sync['step']:.3f}; final held-out "
          f"accuracy difference {100 * (off['final_accuracy'] - sync['final_accuracy']):+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
