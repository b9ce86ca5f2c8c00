"""Score responses under both reward modes and show what a change of mode does to your data.

Reads a JSONL file of {"data_source", "response", "ground_truth", "extra_info"} rows (what a
rollout dump or an eval run holds), scores every row under `rewards.math.compat: or1` (the
default: the paper's rules, last box, golds read as stored) and `released` (Skywork-OR1's
released scorer), and prints the agreement and every row where they differ. A row that cannot be
scored in one mode (a malformed ground truth) is reported with its error for that mode, and
counted; the other rows go on.

    python tools/compare_rewards.py responses.jsonl [--out diff.json] [--show 50]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from or1_megatron.rewards import RewardConfig, compute_score  # noqa: E402
from or1_megatron.rewards import registry  # noqa: E402

MODES = ("or1", "released")
FIELDS = ("data_source", "response", "ground_truth")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that is not an object with the fields is a named error."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}:{number}: not valid JSON: {exc}")
        missing = [f for f in FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise SystemExit(f"{path}:{number}: missing field(s) {missing}")
        rows.append(row)
    return rows


def score_all(rows: list[dict[str, Any]], mode: str) -> list[float | str]:
    """Each row's score under `mode`, or the error text where it could not be scored."""
    previous = registry.get_reward_config()
    registry.set_reward_config(RewardConfig(compat=mode))
    try:
        out: list[float | str] = []
        for row in rows:
            try:
                out.append(compute_score(row["data_source"], row["response"], row["ground_truth"],
                                         row.get("extra_info")))
            except Exception as exc:  # one row's bad data must not hide the others' results
                out.append(f"{type(exc).__name__}: {exc}")
        return out
    finally:
        registry.set_reward_config(previous)


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scores = {mode: score_all(rows, mode) for mode in MODES}
    differ = [{"row": i + 1, "data_source": row["data_source"],
               "ground_truth": row["ground_truth"], "response_tail": row["response"][-200:],
               **{mode: scores[mode][i] for mode in MODES}}
              for i, row in enumerate(rows) if scores["or1"][i] != scores["released"][i]]
    return {"rows": len(rows), "agree": len(rows) - len(differ),
            "agreement": (len(rows) - len(differ)) / max(len(rows), 1),
            "mean": {mode: _mean(scores[mode]) for mode in MODES},
            "errors": {mode: sum(isinstance(s, str) for s in scores[mode]) for mode in MODES},
            "differ": differ}


def _mean(values: list[float | str]) -> float:
    numbers = [v for v in values if not isinstance(v, str)]
    return sum(numbers) / max(len(numbers), 1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("responses", type=Path, help="JSONL: data_source, response, ground_truth, extra_info")
    parser.add_argument("--out", type=Path, help="write the full comparison as JSON")
    parser.add_argument("--show", type=int, default=50, help="differing rows to print")
    args = parser.parse_args(argv)
    result = compare(read_rows(args.responses))
    print(f"rows {result['rows']}: or1 and released agree on {result['agree']} "
          f"({result['agreement']:.1%}); mean reward or1 {result['mean']['or1']:.3f}, released "
          f"{result['mean']['released']:.3f}; rows not scorable: {result['errors']}")
    for item in result["differ"][:args.show]:
        print(f"  row {item['row']} ({item['data_source']}): or1={item['or1']} "
              f"released={item['released']} gold={json.dumps(item['ground_truth'])[:60]} "
              f"response ...{item['response_tail'][-80:]!r}")
    if len(result["differ"]) > args.show:
        print(f"  ... and {len(result['differ']) - args.show} more (--out for all)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
