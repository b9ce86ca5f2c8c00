"""GRPO group advantages and OR1's rejection sampling of groups whose rewards are all equal.

A group is the `group_size` responses sampled for one prompt. The advantage of a response is
its reward standardised within its group, broadcast to every response token by the caller (no
critic, no per-token credit). Groups whose rewards are all equal have zero advantage everywhere:
OR1 drops them from the batch and logs how many prompts were solved by none / all samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`(r - mean_group) / (std_group + eps)` for rewards of shape [prompts, group_size].

    The standard deviation is the unbiased one (torch.std), as in verl's GRPO that the released
    OR1 code builds on. A group of one sample has no spread: its advantage is 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    std = rewards.std(dim=1, keepdim=True)
    return ((rewards - mean) / (std + eps)).float()


@dataclass(frozen=True)
class GroupFilter:
    """Which groups to keep, and why the others went."""

    keep: torch.Tensor      # [prompts] bool
    solve_none: int         # every sample scored 0
    solve_all: int          # every sample scored 1
    uniform_other: int      # all samples equal at another value (non-binary rewards)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def metrics(self) -> dict[str, float]:
        total = max(self.keep.numel(), 1)
        return {
            "rollout/solve_none": self.solve_none / total,
            "rollout/solve_all": self.solve_all / total,
            "rollout/groups_kept": self.kept / total,
        }


def filter_uniform_groups(rewards: torch.Tensor) -> GroupFilter:
    """Rejection sampling: keep only groups whose rewards are not all equal."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    uniform = (rewards == rewards[:, :1]).all(dim=1)
    first = rewards[:, 0]
    solve_none = int((uniform & (first == 0)).sum())
    solve_all = int((uniform & (first == 1)).sum())
    return GroupFilter(
        keep=~uniform,
        solve_none=solve_none,
        solve_all=solve_all,
        uniform_other=int(uniform.sum()) - solve_none - solve_all,
    )
