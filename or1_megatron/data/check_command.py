"""`or1 data check`: what a run would train on, read before any GPU time is spent.

    or1 data check [FILES] [--config FILE [key=value ...]] [--model NAME] [--tokenizer DIR]
                   [--max-prompt-length N]

Owns the data report: rows read per file with every malformed row named (file, row, reason);
rows per data source and ability; the histogram of `extra_info.model_difficulty[NAME]` (solved
samples out of 16 for math, 8 for code); the prompt-length distribution under the tokenizer's
chat template; and the config's filters applied in the trainer's order, with what each keeps.
It uses the loaders and filters `or1 train` uses, so what it says remains is what a run gets.
With `--config`, the files, model name, tokenizer (model.hf_path) and length limit come from the
config unless given here.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any, Sequence

from or1_megatron.data.filters import OFFLINE_SAMPLES, FilterResult, prompt_tokens, training_filters
from or1_megatron.data.loaders import load_problems
from or1_megatron.data.records import DataError, ProblemRecord, SkipCounter
from or1_megatron.errors import OR1Error

LENGTH_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def load_and_report(paths: Sequence[str], fmt: str) -> tuple[list[ProblemRecord], list[str], int]:
    """Every file's records (malformed rows skipped), the report lines naming each skip, and
    how many rows were skipped."""
    records: list[ProblemRecord] = []
    lines: list[str] = []
    malformed = 0
    seen: dict[str, str] = {}
    for path in paths:
        skips = SkipCounter(path)
        loaded = load_problems(path, fmt, on_error="skip", skips=skips)
        lines.append(f"{path}: {skips.total} rows, {len(loaded)} loaded, {skips.skipped} malformed")
        lines += [f"  row {row}: {reason}" for row, reason in skips.rows]
        malformed += skips.skipped
        duplicates = [r.uid for r in loaded if r.uid in seen]
        if duplicates:
            lines.append(f"  {len(duplicates)} uids also in an earlier file (or1 train refuses "
                         f"them), e.g. {duplicates[0]!r} (in {seen[duplicates[0]]})")
        seen.update((r.uid, path) for r in loaded)
        records.extend(loaded)
    return records, lines, malformed


def source_table(records: Sequence[ProblemRecord]) -> list[str]:
    counts = collections.Counter((r.data_source, r.ability) for r in records)
    width = max([len(source) for source, _ in counts] + [len("data_source")])
    lines = [f"{'data_source'.ljust(width)}  ability  rows"]
    lines += [f"{source.ljust(width)}  {ability.ljust(7)}  {n}" for (source, ability), n in sorted(counts.items())]
    return lines


def difficulty_histogram(records: Sequence[ProblemRecord], model: str) -> list[str]:
    """Per ability: how many prompts the model solved k of N times, and how many have no value."""
    lines = [f"model_difficulty[{model}] (prompts solved k of N samples):"]
    by_ability: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for record in records:
        value = (record.extra_info.get("model_difficulty") or {}).get(model)
        by_ability[record.ability]["none" if value is None else str(value)] += 1
    for ability, counts in sorted(by_ability.items()):
        samples = OFFLINE_SAMPLES.get(ability, OFFLINE_SAMPLES["math"])
        cells = [f"{k}:{counts.get(str(k), 0)}" for k in range(samples + 1)]
        others = sorted(set(counts) - {str(k) for k in range(samples + 1)} - {"none"})
        cells += [f"{k}:{counts[k]} (not in 0..{samples})" for k in others]
        lines.append(f"  {ability} (N={samples}): " + " ".join(cells) + f" | no value: {counts.get('none', 0)}")
    return lines


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def length_distribution(lengths: list[int], limit: int | None) -> list[str]:
    if not lengths:
        return ["prompt tokens: no prompts"]
    values = sorted(lengths)
    lines = ["prompt tokens under the chat template: " + ", ".join(
        f"{name} {_percentile(values, q)}" for name, q in
        (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99))) + f", max {values[-1]}"]
    lower = 0
    for upper in LENGTH_BUCKETS:
        n = sum(lower < v <= upper for v in values)
        if n:
            lines.append(f"  {lower + 1:>6}-{upper:<6} {n}")
        lower = upper
    beyond = sum(v > LENGTH_BUCKETS[-1] for v in values)
    if beyond:
        lines.append(f"  >{LENGTH_BUCKETS[-1]:<12} {beyond}")
    if limit is not None:
        lines.append(f"  longer than max_prompt_length={limit}: {sum(v > limit for v in values)}")
    return lines


def _filter_line(name: str, result: FilterResult) -> str:
    return f"  {name}: kept {len(result.kept)} of {result.total} (dropped: {result.dropped_text()})"


def prompt_lengths(records: Sequence[ProblemRecord], tokenizer: Any) -> dict[str, int]:
    from or1_megatron.progress import Progress

    progress = Progress(len(records), "prompt lengths")
    lengths = {}
    for record in records:
        lengths[record.uid] = prompt_tokens(record, tokenizer)
        progress.update()
    return lengths


def report(paths: Sequence[str], fmt: str = "auto", model: str = "", tokenizer_dir: str = "",
           max_prompt_length: int | None = None, pass_rates: str = "", on_error: str = "skip") -> str:
    """The whole report as text (see the module's docstring). `on_error`: the config's
    data.on_error, to say whether `or1 train` would stop at the first malformed row."""
    records, lines, malformed = load_and_report(paths, fmt)
    if on_error == "raise" and malformed:
        lines.append("data.on_error=raise: or1 train stops at the first malformed row; set "
                     "data.on_error=skip to train on the rest (each skip counted and logged)")
    lines += ["", *source_table(records)]
    if model:
        lines += ["", *difficulty_histogram(records, model)]
    tokenizer, lengths = None, {}
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        lengths = prompt_lengths(records, tokenizer)
        lines += ["", *length_distribution(list(lengths.values()), max_prompt_length)]
    else:
        lines += ["", "prompt tokens: not measured (give --tokenizer, or --config with model.hf_path)"]
    lines += ["", "filters, in the trainer's order:"]
    kept, applied = training_filters(records, model=model, pass_rates=pass_rates, tokenizer=tokenizer,
                                     max_prompt_length=max_prompt_length, lengths=lengths)
    lines += [_filter_line(name, result) for name, result in applied]
    abilities = collections.Counter(r.ability for r in kept)
    lines.append(f"would remain: {len(kept)} prompts ("
                 + ", ".join(f"{n} {a}" for a, n in sorted(abilities.items())) + ")")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="or1 data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="report rows, difficulty, prompt lengths and what the filters keep")
    check.add_argument("files", nargs="*", help="data files (default: the config's data.train_files); "
                       "key=value arguments override the config's keys")
    check.add_argument("--config", help="a run config: its files, filters, tokenizer and length limit")
    check.add_argument("--model", help="model_difficulty key (default: data.offline_filter_model)")
    check.add_argument("--tokenizer", help="HF tokenizer dir (default: the config's model.hf_path)")
    check.add_argument("--max-prompt-length", type=int, help="default: the config's batch.max_prompt_length")
    check.add_argument("--format", default=None, help="row format (default: the config's data.format, else auto)")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        print(report(**settings))
    except (OR1Error, OSError) as exc:
        print(f"or1 data check: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    overrides = [a for a in args.files if "=" in a and not Path(a).exists()]
    files = [a for a in args.files if a not in overrides]
    if overrides and not args.config:
        raise DataError("<arguments>", None, f"{overrides[0]}: key=value overrides need --config")
    settings: dict[str, Any] = {"paths": files, "fmt": args.format or "auto",
                                "model": args.model or "", "tokenizer_dir": args.tokenizer or "",
                                "max_prompt_length": args.max_prompt_length, "pass_rates": "",
                                "on_error": "skip"}
    if args.config:
        from or1_megatron.config import load_config

        config = load_config(args.config, overrides)
        settings["paths"] = settings["paths"] or list(config.data.train_files)
        settings["fmt"] = args.format or config.data.format
        settings["model"] = settings["model"] or config.data.offline_filter_model
        settings["tokenizer_dir"] = settings["tokenizer_dir"] or config.model.hf_path
        settings["pass_rates"] = config.data.offline_filter_pass_rates
        settings["on_error"] = config.data.on_error
        if settings["max_prompt_length"] is None:
            settings["max_prompt_length"] = config.batch.max_prompt_length
    if not settings["paths"]:
        raise DataError("<arguments>", None, "no data files: name them, or give --config with data.train_files")
    missing = [p for p in settings["paths"] if not Path(p).is_file()]
    if missing:
        raise DataError(missing[0], None, "no such file")
    return settings
