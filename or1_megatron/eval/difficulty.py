"""tools/estimate_difficulty.py: measure how often a model solves each prompt, for the offline filter.

    python tools/estimate_difficulty.py --model-path DIR --data FILE... [--n N] --out FILE [--resume]

Samples N responses per prompt through the rollout engines (the same path as `or1 eval`, see
sampling.py), scores them, and writes the pass-rate file `data.filters.load_pass_rates` reads:
JSON lines {"uid", "solved", "samples"}, which `filter_by_pass_rate` consumes (OR1 drops prompts
solved 0/N or N/N). Without `--n`, N is the paper's per ability: 16 for math, 8 for code
(`filters.OFFLINE_SAMPLES`). Each prompt's line is appended as soon as it is scored, so an
interrupted run keeps its work; `--resume` skips the uids already in the file. This module owns the
command line and the file writing only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from or1_megatron.data.filters import (
    OFFLINE_SAMPLES, filter_by_pass_rate, format_pass_rate, load_pass_rates,
)
from or1_megatron.data.records import ProblemRecord
from or1_megatron.errors import OR1Error
from or1_megatron.eval import sampling


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="estimate_difficulty.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None,
                        help="samples per prompt (default: 16 for math, 8 for code, as the paper)")
    parser.add_argument("--out", type=Path, required=True, help="pass-rate file (JSON lines) to write")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and sample only the prompts not in it")
    sampling.add_sampling_arguments(parser, max_new_tokens=16384)
    return parser.parse_args(argv)


def offline_samples(record: ProblemRecord) -> int:
    """The paper's samples per prompt for the offline filter, by ability."""
    return OFFLINE_SAMPLES.get(record.ability, OFFLINE_SAMPLES["math"])


class _Appender:
    """Appends one pass-rate line per scored prompt; the file is opened at the first line, so a run
    that fails before any prompt is scored leaves no file behind to --resume from."""

    def __init__(self, path: Path):
        self.path = path
        self.file: TextIO | None = None

    def __call__(self, outcome: sampling.ProblemOutcome) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(format_pass_rate(outcome.uid, outcome.correct, outcome.samples))
        self.file.flush()  # a killed run keeps every prompt scored so far

    def __enter__(self) -> "_Appender":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def main(argv: list[str]) -> int:
    """Entry point of tools/estimate_difficulty.py."""
    args = parse_args(argv)
    try:
        if args.n is not None and args.n < 1:
            raise sampling.SamplingError(f"--n must be >= 1, got {args.n}")
        records = sampling.records_from_args(args)
        done: dict[str, tuple[int, int]] = {}
        if args.out.exists():
            if not args.resume:
                raise sampling.SamplingError(f"{args.out} exists; pass --resume to continue it or "
                                             "remove it")
            done = load_pass_rates(args.out)
        todo = [r for r in records if r.uid not in done]
        print(f"estimate_difficulty: {len(todo)} prompts to sample ({len(records) - len(todo)} "
              f"already in {args.out})", file=sys.stderr, flush=True)
        if todo:
            counts = sampling.samples_per_problem(todo, args.n, offline_samples)
            with _Appender(args.out) as append:
                sampling.sample_from_args(args, todo, counts, on_problem=append,
                                          label="estimate_difficulty: samples scored")
        rates = load_pass_rates(args.out) if args.out.exists() else {}
    except OR1Error as exc:
        print(f"estimate_difficulty: error: {exc}", file=sys.stderr)
        return 2
    kept = filter_by_pass_rate(records, rates)
    dropped = ", ".join(f"{n} {reason}" for reason, n in kept.dropped.most_common()) or "none"
    print(f"pass rates of {len(rates)} prompts in {args.out}; the offline filter keeps "
          f"{len(kept.kept)} of {len(records)} (dropped: {dropped})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
