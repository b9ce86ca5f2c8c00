"""A rollout batch as the trainer consumes it: token sequences with per-token training extras.

Owns the layout decisions shared by the driver and the trainer ranks: a sample's sequence is
prompt + response; per predicted position (length L - 1) it carries the response mask, the
advantage (the group's, broadcast over response tokens) and the old log-probability. It also
splits samples into mini-batches (one per optimizer step) and a mini-batch over data-parallel
ranks, balancing tokens, deterministically, so that every rank computes the same split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def response_mask(prompt_length: int, length: int) -> torch.Tensor:
    """1 where position j predicts a response token (positions prompt_length - 1 ... length - 2);
    host data, packed and moved to the device by the trainer."""
    mask = torch.zeros(length - 1, device="cpu")
    mask[prompt_length - 1:] = 1.0
    return mask


@dataclass
class TrainSample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    group: int  # index of its prompt in the rollout batch
    engine_logprobs: list[float] | None = None  # the engine's, of each response token

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def response_mask(self) -> torch.Tensor:
        return response_mask(len(self.prompt_ids), len(self.prompt_ids) + len(self.response_ids))


@dataclass
class TrainBatch:
    samples: list[TrainSample]
    old_logprobs: list[torch.Tensor] = field(default_factory=list)  # per sample, length L - 1
    # Importance-sampling weights per sample (length L - 1), when algo.is_correction is on.
    is_weights: list[torch.Tensor] = field(default_factory=list)

    @property
    def sequences(self) -> list[list[int]]:
        return [s.sequence for s in self.samples]

    def response_tokens(self, indices: list[int] | None = None) -> int:
        chosen = range(len(self.samples)) if indices is None else indices
        return sum(len(self.samples[i].response_ids) for i in chosen)

    def extras(self, indices: list[int]) -> dict[str, list[torch.Tensor]]:
        """Per-token tensors of the samples `indices`, in that order, for packing."""
        masks = [self.samples[i].response_mask() for i in indices]
        extras = {
            "response_mask": masks,
            "advantages": [m * self.samples[i].advantage for m, i in zip(masks, indices)],
            "old_logprob": [self.old_logprobs[i] for i in indices],
        }
        if self.is_weights:
            extras["is_weight"] = [self.is_weights[i] for i in indices]
        return extras


def mini_batches(batch: TrainBatch, count: int) -> list[list[int]]:
    """Split the samples into `count` mini-batches of whole groups (prompts), in order."""
    groups = sorted({s.group for s in batch.samples})
    per = -(-len(groups) // count)
    chunks = [set(groups[i * per:(i + 1) * per]) for i in range(count)]
    return [[i for i, s in enumerate(batch.samples) if s.group in chunk] for chunk in chunks
            if chunk]


def split_over_data_parallel(lengths: list[int], indices: list[int], dp_size: int) -> list[list[int]]:
    """`indices` into `dp_size` shares of nearly equal token counts (longest first, to the
    lightest share); each share keeps ascending order. Every rank computes the same split."""
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        lightest = min(range(dp_size), key=lambda r: (load[r], r))
        shares[lightest].append(i)
        load[lightest] += lengths[i]
    return [sorted(share) for share in shares]
