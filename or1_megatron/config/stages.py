"""MAGIC's multi-stage schedule resolved into concrete stages with step ranges.

A stage in the config may leave a size at 0, meaning "as in `batch`"; `resolve_stages` fills
those in and numbers the stages' step ranges, so the loop, the validator, the planner and the
Slurm tool read one list instead of each re-deriving the offsets. Import-light (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass

from or1_megatron.config.schema import OR1Config


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    first_step: int          # global step index of the stage's first rollout batch
    steps: int
    max_response_length: int
    rollout_prompts: int
    mini_batch_prompts: int
    group_size: int

    @property
    def end_step(self) -> int:
        """One past the stage's last step."""
        return self.first_step + self.steps

    @property
    def sgd_steps(self) -> int:
        """Optimizer steps per rollout batch (N_SGD)."""
        return self.rollout_prompts // max(self.mini_batch_prompts, 1)

    @property
    def key_prefix(self) -> str:
        return f"stages[{self.index}]"

    @property
    def key(self) -> str:
        """How the config names this stage in messages."""
        return f"stages[{self.index}]" if self.name == "" else f"stages[{self.index}] ({self.name})"


def resolve_stages(config: OR1Config) -> list[Stage]:
    """The stages in order; an empty `stages` list is one stage of `batch` for run.max_steps."""
    b = config.batch
    declared = config.stages or []
    if not declared:
        return [Stage(0, "", 0, config.run.max_steps, b.max_response_length, b.rollout_prompts,
                      b.mini_batch_prompts, b.group_size)]
    stages, first = [], 0
    for index, s in enumerate(declared):
        stages.append(Stage(
            index=index, name=s.name, first_step=first, steps=s.steps,
            max_response_length=s.max_response_length or b.max_response_length,
            rollout_prompts=s.rollout_prompts or b.rollout_prompts,
            mini_batch_prompts=s.mini_batch_prompts or b.mini_batch_prompts,
            group_size=s.group_size or b.group_size,
        ))
        first += s.steps
    return stages


def total_steps(config: OR1Config) -> int:
    """Steps the run makes: the stages' sum, cut at run.max_steps when that is set."""
    scheduled = sum(s.steps for s in resolve_stages(config))
    limit = config.run.max_steps
    if not config.stages:
        return limit
    return min(scheduled, limit) if limit else scheduled


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that global step `step` belongs to (the last one past the schedule's end)."""
    for stage in stages:
        if step < stage.end_step:
            return stage
    return stages[-1]
