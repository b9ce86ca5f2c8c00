"""The CPU demo's synthetic task: two-digit additions answered in OR1's response format.

Owns the problem generator (train and held-out problems drawn without overlap from one seeded
stream, as math ProblemRecords that the math reward scores) and the reference responses the
supervised warm-up trains on: the digit sums with their carry inside `<think>`, then
`</think>\\n\\boxed{c}`. It never tokenizes or trains anything itself.
"""
from __future__ import annotations

import random

from or1_megatron.config.schema import ArithmeticTaskConfig
from or1_megatron.data.chat_template import THINK_CLOSE
from or1_megatron.data.records import ProblemRecord

DATA_SOURCE = "arithmetic"


def _problem(a: int, b: int, split: str) -> ProblemRecord:
    return ProblemRecord(
        uid=f"{split}-{a}+{b}", data_source=DATA_SOURCE, ability="math",
        prompt=[{"role": "user", "content": f"What is {a} + {b}?"}],
        ground_truth=str(a + b), extra_info={"split": split, "a": a, "b": b})


def arithmetic_problems(task: ArithmeticTaskConfig) -> tuple[list[ProblemRecord], list[ProblemRecord]]:
    """(train, held-out): distinct operand pairs in [0, max_operand], held-out ones never trained on."""
    pairs = [(a, b) for a in range(task.max_operand + 1) for b in range(task.max_operand + 1)]
    wanted = task.train_problems + task.heldout_problems
    if wanted > len(pairs):
        raise ValueError(f"data.arithmetic: {wanted} problems asked for, but operands up to "
                         f"max_operand={task.max_operand} give only {len(pairs)} distinct ones")
    random.Random(task.seed).shuffle(pairs)
    heldout = [_problem(a, b, "heldout") for a, b in pairs[:task.heldout_problems]]
    train = [_problem(a, b, "train") for a, b in pairs[task.heldout_problems:wanted]]
    return train, heldout


def reference_response(record: ProblemRecord) -> str:
    """The worked answer the warm-up teaches: digit by digit with the carry, then the boxed sum;
    the text after the template's `<think>\\n`, to be followed by the EOS token.

    Each step is a one-digit sum every training problem exercises, so a small model can learn
    the procedure and carry it to held-out pairs instead of memorising a table of sums."""
    a, b = record.extra_info["a"], record.extra_info["b"]
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return (f"{a % 10} + {b % 10} = {units}, {a // 10} + {b // 10} + {units // 10} = {tens}\n"
            f"{THINK_CLOSE}\n\\boxed{{{a + b}}}")


def tokenizer_corpus(task: ArithmeticTaskConfig) -> list[str]:
    """Text to train the demo's tokenizer on: prompts and reference responses of the task."""
    train, heldout = arithmetic_problems(task)
    return [f"{r.question} {reference_response(r)}" for r in train + heldout]
