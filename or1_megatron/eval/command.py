"""`or1 eval`: avg@k and pass@k of a model on evaluation problems, per data source.

    or1 eval --model-path DIR --data eval/aime24.parquet eval/aime25.parquet [--k K] \\
        [--engines N] [--max-new-tokens 32768] [--temperature 1.0] [--out FILE]

Samples k responses per problem through rollout engines (CPU `or1 serve` processes, or SGLang on
GPUs), scores them with the reward pool and reports, per data source, avg@k (mean correctness
over the k samples of a problem, averaged over problems) and the unbiased pass@k. Without `--k`,
k follows the paper per data source (avg@32 for AIME, avg@4 for LiveCodeBench, 4 otherwise; see
or1_megatron/eval/metrics.py). Prints a table and writes a JSON file with the metrics, the
per-problem correctness counts, the settings and the model path. This module owns the command
line and the result file only; sampling is sampling.py's, the arithmetic metrics.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from or1_megatron.errors import OR1Error
from or1_megatron.eval import sampling
from or1_megatron.eval.metrics import default_k, format_table, source_metrics


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="or1 eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=None,
                        help="samples per problem for every source (default: per source, the paper's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: eval-<model dir name>-<time>.json here)")
    sampling.add_sampling_arguments(parser, max_new_tokens=32768)
    return parser.parse_args(argv)


def evaluation_report(model_path: str, outcomes: Sequence[sampling.ProblemOutcome],
                      settings: dict[str, Any], duration_s: float) -> dict[str, Any]:
    """The result file's content."""
    return {"model_path": str(Path(model_path).resolve()),
            "metrics": source_metrics(o.count() for o in outcomes),
            "settings": settings,
            "problems": [o.summary() for o in outcomes],
            "reward_errors": sum(o.reward_errors for o in outcomes),
            "duration_s": round(duration_s, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Write atomically: an interrupted run never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """Entry point of `or1 eval`."""
    args = parse_args(argv)
    start = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(f"eval-{Path(args.model_path).resolve().name}-{stamp}.json")
    try:
        if args.k is not None and args.k < 1:
            raise sampling.SamplingError(f"--k must be >= 1, got {args.k}")
        records = sampling.records_from_args(args)
        counts = sampling.samples_per_problem(records, args.k, lambda r: default_k(r.data_source))
        rule = "explicit --k" if args.k is not None else "per data source (metrics.DEFAULT_K_RULES)"
        settings = {"k": args.k, "k_rule": rule, **sampling.settings_record(args)}
        print(f"or1 eval: {len(records)} problems, {sum(counts)} samples, model {args.model_path}",
              file=sys.stderr, flush=True)
        outcomes = sampling.sample_from_args(args, records, counts, label="or1 eval: samples scored")
    except OR1Error as exc:
        print(f"or1 eval: error: {exc}", file=sys.stderr)
        return 2
    report = evaluation_report(args.model_path, outcomes, settings, time.monotonic() - start)
    write_json(out, report)
    print(format_table(report["metrics"]))
    if report["reward_errors"]:
        print(f"warning: {report['reward_errors']} samples scored 0 because their reward failed "
              "(see the log above)", file=sys.stderr)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
