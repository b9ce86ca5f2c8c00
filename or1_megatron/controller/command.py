"""`or1 train --config FILE [--run-dir DIR] [--resume auto|never] [--max-steps N] [key=value ...]`.

The command-line contract scripts and the Slurm launcher rely on: exit 0 when the run reached
its last step; 2 for a bad config, bad data or a run directory that does not fit --resume; 1 for
a failure during the run; 143 after SIGTERM, once the checkpoint is written (resume with
--resume auto). The run directory (default runs/<config name>) holds config.yaml,
checkpoints/, tensorboard/, metrics.jsonl, engine_logs/ and train.log.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from or1_megatron.errors import OR1Error

EXIT_STOPPED = 143


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="or1 train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--run-dir", help="run directory (default: run.run_dir or runs/<config name>)")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from the newest checkpoint in the run directory, if any; "
                             "never: refuse a run directory that has checkpoints")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in total")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-6")
    return parser.parse_args(argv)


def _setup_logging(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines are set-up chatter
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "train.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: list[str]) -> int:
    from or1_megatron.config.loader import default_run_dir, load_config

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.run_dir:
        overrides.append(f"run.run_dir={args.run_dir}")
    try:
        config = load_config(args.config, overrides)
    except OR1Error as exc:
        print(f"or1 train: error: {exc}", file=sys.stderr)
        return 2
    run_dir = default_run_dir(args.config, config.run.run_dir).resolve()
    config.run.run_dir = str(run_dir)
    _setup_logging(run_dir)

    from or1_megatron.controller.loop import StopFlag
    from or1_megatron.controller.run import ResumeError, train
    from or1_megatron.data.records import DataError

    stop = StopFlag()
    try:
        asyncio.run(train(config, run_dir, args.resume, stop))
    except (ResumeError, DataError) as exc:
        print(f"or1 train: error: {exc}", file=sys.stderr)
        return 2
    except OR1Error as exc:
        print(f"or1 train: failed: {exc}", file=sys.stderr)
        return 1
    if stop.requested:
        return EXIT_STOPPED
    return 0
