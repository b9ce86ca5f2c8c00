"""tools/compare_rewards.py on hand-made rows: agreement, every differing row, bad rows named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "<think>\nwork\n</think>\nThe answer is \\boxed{25}."
ROWS = [
    {"data_source": "aime", "response": ANSWER, "ground_truth": "025"},           # agree: 1
    {"data_source": "aime", "response": ANSWER, "ground_truth": "26"},            # agree: 0
    {"data_source": "aime", "response": ANSWER, "ground_truth": "025",            # cut: 0 vs 1
     "extra_info": {"finish_reason": "length"}},
    {"data_source": "aime", "response": "<think>x</think> \\boxed{10}",           # list: 1 vs 0
     "ground_truth": "['10', '12']"},
    {"data_source": "leetcode", "response": ANSWER, "ground_truth": "25"},        # routed: error vs 1
]


def test_compare_rewards_reports_agreement_and_each_difference(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "diff.json"
    done = subprocess.run([sys.executable, "tools/compare_rewards.py", str(data), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rows 5: or1 and released agree on 2 (40.0%)" in done.stdout
    result = json.loads(out.read_text())
    differ = {d["row"]: (d["or1"], d["released"]) for d in result["differ"]}
    assert differ[3] == (0.0, 1.0) and differ[4] == (1.0, 0.0)
    assert differ[5][1] == 1.0 and differ[5][0].startswith("GroundTruthError")
    assert result["errors"] == {"or1": 1, "released": 0}


def test_a_malformed_line_is_named(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n{\"data_source\": \"aime\"}\n")
    done = subprocess.run([sys.executable, "tools/compare_rewards.py", str(data)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "rows.jsonl:2: missing field(s) ['response', 'ground_truth']" \
        in done.stderr
