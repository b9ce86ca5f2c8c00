"""Offline (model_difficulty or measured pass rate) and online (between stages) prompt filters."""
import json

import pytest

from or1_megatron.data.decontamination import decontaminate
from or1_megatron.data.filters import (
    SolveTracker, filter_by_model_difficulty, filter_by_pass_rate, load_pass_rates, online_filter,
    training_filters,
)
from or1_megatron.data.loaders import load_problems
from or1_megatron.data.records import DataError, ProblemRecord

MODEL = "DeepSeek-R1-Distill-Qwen-7B"


def _record(uid, ability="math", difficulty=None):
    extra = {"model_difficulty": {MODEL: difficulty}} if difficulty is not None else {}
    return ProblemRecord(uid=uid, data_source="s", ability=ability,
                         prompt=[{"role": "user", "content": uid}], ground_truth="1", extra_info=extra)


def test_model_difficulty_drops_all_and_none_solved():
    records = [_record("m0", difficulty=0), _record("m1", difficulty=1), _record("m15", difficulty=15),
               _record("m16", difficulty=16), _record("c8", "code", 8), _record("c7", "code", 7),
               _record("none")]
    result = filter_by_model_difficulty(records, MODEL)
    assert [r.uid for r in result.kept] == ["m1", "m15", "c7"]
    assert result.dropped == {"solved 0/16": 1, "solved 16/16": 1, "solved 8/8": 1,
                              f"no model_difficulty for {MODEL}": 1}


def test_pass_rate_file(tmp_path):
    path = tmp_path / "rates.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"uid": "a", "solved": 0, "samples": 8}, {"uid": "b", "solved": 3, "samples": 8},
        {"uid": "c", "solved": 8, "samples": 8}]) + "\n")
    result = filter_by_pass_rate([_record(u) for u in "abcd"], load_pass_rates(path))
    assert [r.uid for r in result.kept] == ["b"]
    assert result.dropped["no measured pass rate"] == 1
    path.write_text(json.dumps({"uid": "a", "solved": 9, "samples": 8}) + "\n")
    with pytest.raises(DataError, match=r"rates\.jsonl: row 0: solved=9"):
        load_pass_rates(path)


class _CharTokenizer:
    """A bare chat template and one token per character: a prompt's length is its text's."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text)}


def test_training_filters_apply_the_configured_ones_in_the_trainers_order(tmp_path):
    records = [_record("a", difficulty=0), _record("bb", difficulty=3), _record("ccc", difficulty=5),
               _record("dddd", difficulty=7)]
    rates = tmp_path / "rates.jsonl"
    rates.write_text("\n".join(json.dumps({"uid": u, "solved": s, "samples": 8})
                               for u, s in [("a", 4), ("bb", 8), ("ccc", 2), ("dddd", 1)]) + "\n")
    kept, applied = training_filters(records, model=MODEL, pass_rates=rates, tokenizer=_CharTokenizer(),
                                     max_prompt_length=3)
    assert [r.uid for r in kept] == ["ccc"]
    assert [name for name, _ in applied] == [
        f"offline, model_difficulty[{MODEL}] solved neither 0 nor N", f"offline, pass rates of {rates}",
        "prompt length <= 3 tokens"]
    assert [(len(r.kept), r.total) for _, r in applied] == [(3, 4), (2, 3), (1, 2)]
    # nothing configured: nothing applied, nothing dropped
    assert training_filters(records) == (records, [])


def test_online_filter_drops_prompts_solved_in_every_sample():
    tracker = SolveTracker()
    tracker.update(["a"] * 4 + ["b"] * 4, [1, 1, 1, 1, 1, 0, 1, 1])
    tracker.update(["c"] * 2, [1.0, 1.0])
    tracker.update(["b"] * 2, [1, 1])
    restored = SolveTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    result = online_filter([_record(u) for u in "abcd"], restored)
    assert [r.uid for r in result.kept] == ["b", "d"]


def test_decontamination_removes_copies_of_evaluation_problems(shared_data):
    train = load_problems(shared_data / "train" / "aime_1983_2023.json")
    aime = (load_problems(shared_data / "eval" / "aime24.parquet")
            + load_problems(shared_data / "eval" / "aime25.parquet"))
    # AIME 2024/25 are not in the 1983-2023 set: nothing is removed for stock phrases alone.
    kept, removed = decontaminate(train, aime)
    assert removed == []
    # Copies re-typed with other case, spacing and LaTeX, with another instruction, are caught.
    copies = []
    for i, record in enumerate(aime[:5]):
        text = record.question.split("Let's think")[0].upper().replace("$", " ")
        copies.append(ProblemRecord(uid=f"copy{i}", data_source="s", ability="math",
                                    prompt=[{"role": "user", "content": "Solve: " + text}],
                                    ground_truth="1"))
    kept, removed = decontaminate(train + copies, aime)
    assert [r.uid for r in removed] == [c.uid for c in copies]
    assert len(kept) == len(train)


def test_decontamination_finds_aime_problems_inside_math500(shared_data):
    train = load_problems(shared_data / "train" / "aime_1983_2023.json")
    math500 = load_problems(shared_data / "eval" / "math500.json")
    kept, removed = decontaminate(train, math500)
    assert 1 <= len(removed) <= 20  # MATH includes a few AIME problems verbatim
    assert len(kept) + len(removed) == len(train)
