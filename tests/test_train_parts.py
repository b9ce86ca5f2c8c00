"""The training loop's driver-side parts: prompt sampling, batch splits, the demo task,
checkpoint discovery and the metrics file, each against what a resumed run relies on."""
import json

import pytest
import torch

from or1_megatron.config.schema import ArithmeticTaskConfig
from or1_megatron.controller.batch import (
    TrainBatch, TrainSample, mini_batches, response_mask, split_over_data_parallel,
)
from or1_megatron.controller.checkpoints import CheckpointDirs
from or1_megatron.controller.metrics import MetricsWriter, console_line
from or1_megatron.controller.sampler import PromptSampler
from or1_megatron.data.arithmetic import arithmetic_problems, reference_response
from or1_megatron.rewards import compute_score


def records(n=10):
    train, _ = arithmetic_problems(ArithmeticTaskConfig(enabled=True, train_problems=n,
                                                        heldout_problems=0, max_operand=9))
    return train


def test_sampler_resumes_exactly_and_covers_each_epoch():
    data = records(10)
    straight = PromptSampler(data, seed=3)
    batches = [straight.next_batch(4) for _ in range(6)]  # 24 prompts: crosses two epochs
    first_epoch = [r.uid for b in batches for r in b][:10]
    assert sorted(first_epoch) == sorted(r.uid for r in data)

    resumed = PromptSampler(data, seed=3)
    for _ in range(3):
        resumed.next_batch(4)
    state = json.loads(json.dumps(resumed.state_dict()))  # as it travels in a checkpoint
    fresh = PromptSampler(data, seed=3)
    fresh.load_state_dict(state)
    assert [[r.uid for r in fresh.next_batch(4)] for _ in range(3)] == \
        [[r.uid for r in b] for b in batches[3:]]
    with pytest.raises(ValueError, match="saw 10 training problems, this run has 9"):
        PromptSampler(data[:9], seed=3).load_state_dict(state)


def test_mini_batches_keep_groups_whole_and_dp_shares_balance_tokens():
    samples = [TrainSample([1, 2], [3] * (1 + k), 0.5, group=k // 2) for k in range(8)]
    batch = TrainBatch(samples)
    parts = mini_batches(batch, 2)
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7]]
    lengths = [len(s) for s in batch.sequences]
    shares = split_over_data_parallel(lengths, list(range(8)), 2)
    assert sorted(shares[0] + shares[1]) == list(range(8))
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(lengths) - min(lengths)
    assert split_over_data_parallel(lengths, [0], 2) == [[0], []]


def test_response_mask_marks_the_positions_that_predict_response_tokens():
    # sequence p0 p1 p2 r0 r1: positions 2 and 3 predict r0 and r1
    assert response_mask(3, 5).tolist() == [0.0, 0.0, 1.0, 1.0]
    sample = TrainSample([7, 8, 9], [1, 2], advantage=-0.5, group=0)
    extras = TrainBatch([sample], old_logprobs=[torch.zeros(4)]).extras([0])
    assert extras["advantages"][0].tolist() == [0.0, 0.0, -0.5, -0.5]


def test_arithmetic_task_heldout_is_disjoint_and_reference_answers_score_one():
    task = ArithmeticTaskConfig(enabled=True, train_problems=300, heldout_problems=40)
    train, heldout = arithmetic_problems(task)
    assert len(train) == 300 and len(heldout) == 40
    assert not {r.question for r in train} & {r.question for r in heldout}
    for record in train[:20] + heldout[:20]:
        answer = reference_response(record)
        assert compute_score(record.data_source, answer, record.ground_truth,
                             {"finish_reason": "stop"}) == 1.0
        wrong = answer.replace(f"boxed{{{record.ground_truth}}}", "boxed{1000}")
        assert compute_score(record.data_source, wrong, record.ground_truth,
                             {"finish_reason": "stop"}) == 0.0
    with pytest.raises(ValueError, match="only 100 distinct"):
        arithmetic_problems(ArithmeticTaskConfig(enabled=True, train_problems=90,
                                                 heldout_problems=20, max_operand=9))


def fake_checkpoint(path):
    path.mkdir(parents=True)
    (path / "or1_checkpoint.json").write_text(json.dumps({"format_version": 1}))


def test_checkpoint_dirs_skip_incomplete_saves_and_prune(tmp_path):
    dirs = CheckpointDirs(tmp_path)
    for step in (0, 10, 20):
        fake_checkpoint(dirs.for_step(step))
    dirs.for_step(30).mkdir()  # killed before its metadata was written
    (dirs.root / "step_0000040.saving").mkdir()
    assert dirs.latest() == (20, dirs.for_step(20))
    dirs.prune(keep=2)
    assert [step for step, _ in dirs.complete()] == [10, 20]


def test_metrics_file_is_cut_back_to_the_resumed_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True, resume_after_step=-1)
    for step in range(0, 5):
        writer.write(step, {"stage": 0, "reward/mean": step / 10}, total_steps=4)
    writer.close()
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_after_step=2)
    resumed.write(3, {"stage": 0, "reward/mean": 0.9}, total_steps=4)
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward/mean"]) for r in lines] == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.9)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert console_line(3, 4, {"stage": 1, "reward/mean": 0.5, "time/step_s": 2.25}) == \
        "step 3/4 | stage 1 | reward 0.500 | step_s 2.2"
