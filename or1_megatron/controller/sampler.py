"""Which prompts each rollout batch takes: seeded epochs over the training set, resumable.

The order of an epoch is a permutation drawn from (seed, epoch), so the sampler's whole state is
two integers (epoch, position) that go into every checkpoint; a resumed run draws exactly the
prompts the uninterrupted run would have. Between stages the online filter may shrink the set:
`replace_records` keeps the epoch and restarts its position on the new set.
"""
from __future__ import annotations

import random
from typing import Sequence

from or1_megatron.data.records import ProblemRecord


class PromptSampler:
    def __init__(self, records: Sequence[ProblemRecord], seed: int):
        if not records:
            raise ValueError("the prompt sampler needs at least one training problem")
        self.records = list(records)
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[ProblemRecord]:
        """`size` prompts; an epoch boundary inside a batch continues with the next epoch."""
        batch: list[ProblemRecord] = []
        order = self._order()
        while len(batch) < size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            take = order[self.position:self.position + size - len(batch)]
            batch.extend(self.records[i] for i in take)
            self.position += len(take)
        return batch

    def replace_records(self, records: Sequence[ProblemRecord]) -> None:
        if not records:
            raise ValueError("the online filter left no training problems")
        self.records = list(records)
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.records)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != len(self.records):
            raise ValueError(f"the checkpoint's sampler saw {state['size']} training problems, this "
                             f"run has {len(self.records)}: the data or its filters changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
