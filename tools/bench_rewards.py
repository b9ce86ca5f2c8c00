"""Reward throughput: math answers/s through the reward pool, and the sandbox's cost per test case.

Prints ratios measured in one run:
- math: answers/s in one process and through a RewardPool of --workers processes, on the
  AIME24/25 and MATH-500 gold answers written as a model would;
- sandbox: wall time of a trivial program run bare (`python -I`) and in the sandbox; the
  difference is the sandbox's overhead per test case (target: under 50 ms);
- code: wall time per stdin test case of a real LiveCodeBench row through `code_score`.

Usage: python tools/bench_rewards.py [--data ../shared/data] [--workers 2] [--runs 40]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from or1_megatron.data.loaders import load_problems
from or1_megatron.rewards import RewardConfig, RewardPool, Sandbox, code_score, compute_score

SECOND_LARGEST = "n = int(input())\na = list(map(int, input().split()))\nprint(a.index(sorted(a)[-2]) + 1)\n"


def _math_tasks(data: Path, repeat: int) -> list[dict]:
    records = (load_problems(data / "eval" / "aime24.parquet") + load_problems(data / "eval" / "aime25.parquet")
               + load_problems(data / "eval" / "math500.json"))
    tasks = [dict(solution_str=f"<think>\nwork\n</think>\nThe answer is \\boxed{{{r.ground_truth}}}.",
                  **r.reward_kwargs()) for r in records]
    return tasks * repeat


def bench_math(data: Path, workers: int, repeat: int) -> None:
    tasks = _math_tasks(data, repeat)
    compute_score(**tasks[0])  # import and warm math-verify outside the timing
    serial, pooled, serial_s, pooled_s = [], [], 0.0, 0.0
    with RewardPool(num_workers=workers) as pool:
        pool.map(tasks[:workers * 2])  # workers started and warm
        # Alternating chunks, so that a change in the machine's load hits both alike.
        for chunk in range(0, len(tasks), 80):
            part = tasks[chunk:chunk + 80]
            start = time.perf_counter()
            serial += [compute_score(**t) for t in part]
            serial_s += time.perf_counter() - start
            start = time.perf_counter()
            pooled += pool.map(part)
            pooled_s += time.perf_counter() - start
    assert pooled == serial, "pool and in-process scores differ"
    print(f"math: {len(tasks)} answers, {sum(serial):.0f} correct")
    print(f"math: in-process {len(tasks) / serial_s:8.1f} answers/s")
    print(f"math: pool of {workers}   {len(tasks) / pooled_s:8.1f} answers/s "
          f"(x{serial_s / pooled_s:.2f} vs in-process)")


def _median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of finished child processes) spent in fn()."""
    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    cpu, start = children_cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - start, children_cpu() - cpu


def bench_sandbox(data: Path, runs: int) -> None:
    sandbox = Sandbox(RewardConfig().sandbox)
    python = sandbox.python
    # Interleaved pairs: on a shared machine the load drifts between two separate timing blocks.
    # CPU time (of the child processes) hardly depends on the load; wall time does.
    bare, boxed = [], []
    for _ in range(runs):
        bare.append(_timed(lambda: subprocess.run([python, "-I", "-c", "pass"], check=True)))
        boxed.append(_timed(lambda: sandbox.run_python("pass")))
    for what, index in (("wall", 0), ("cpu ", 1)):
        plain = statistics.median(t[index] for t in bare)
        sandboxed = statistics.median(t[index] for t in boxed)
        overhead = statistics.median(b[index] - a[index] for a, b in zip(bare, boxed))
        print(f"sandbox ({sandbox.backend}) {what}: bare python {plain * 1e3:6.1f} ms, sandboxed "
              f"{sandboxed * 1e3:6.1f} ms, overhead {overhead * 1e3:6.1f} ms per test case "
              f"(median of {runs} interleaved pairs; target < 50 ms)")
    record = load_problems(data / "code" / "livecodebench_public_part1.json")[0]
    response = f"<think>x</think>\n```python\n{SECOND_LARGEST}```"
    cases = len(record.ground_truth["inputs"])
    per_row = _median_s(lambda: code_score(response, record.ground_truth), max(3, runs // 4))
    print(f"code: LiveCodeBench stdin row, {cases} test cases: {per_row / cases * 1e3:6.1f} ms per test case "
          "(sandbox + interpreter start + program)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40, help="repetitions of each sandbox timing")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the math answers")
    args = parser.parse_args(argv)
    print("load average over 1 min before the run: %.2f on %d cores" % (os.getloadavg()[0], os.cpu_count()))
    bench_sandbox(args.data, args.runs)
    bench_math(args.data, args.workers, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
