"""One rollout batch: `group_size` samples of each prompt from the engines, then their rewards.

Owns turning prompts into scored groups: prompt token ids through the tokenizer's chat
template, one request per sample through the router (so an engine crash re-sends, never loses,
a sample), per-sample seeds derived from (run seed, step, prompt uid, sample index) so a resumed
run samples exactly what the uninterrupted one did, and scoring in the reward pool with the
engine's finish reason (OR1: a truncated response scores 0). It computes no advantages.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from or1_megatron.data.records import ProblemRecord
from or1_megatron.eval.sampling import SamplingSession, SamplingSettings, prompt_token_ids


@dataclass
class Group:
    record: ProblemRecord
    prompt_ids: list[int]
    responses: list[list[int]]
    finish_reasons: list[str]
    rewards: list[float]
    # The engine's log-prob of each response token (when asked for), and the weight version
    # that generated each response.
    engine_logprobs: list[list[float]] | None = None
    weight_versions: list[str | None] | None = None


@dataclass
class RolloutBatch:
    groups: list[Group]
    reward_errors: int

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (records by uid)."""
        return {"reward_errors": self.reward_errors,
                "groups": [{**{k: v for k, v in vars(g).items() if k != "record"},
                            "uid": g.record.uid} for g in self.groups]}

    @classmethod
    def from_state(cls, state: dict[str, Any], records: dict[str, ProblemRecord]) -> "RolloutBatch":
        groups = [Group(record=records[g["uid"]], **{k: v for k, v in g.items() if k != "uid"})
                  for g in state["groups"]]
        return cls(groups, state["reward_errors"])

    def rewards(self) -> torch.Tensor:
        """[prompts, group_size]"""
        return torch.tensor([g.rewards for g in self.groups], dtype=torch.float32)

    def metrics(self) -> dict[str, float]:
        lengths = [len(r) for g in self.groups for r in g.responses]
        reasons = [f for g in self.groups for f in g.finish_reasons]
        out = {
            "reward/mean": float(self.rewards().mean()),
            "response/length_mean": sum(lengths) / len(lengths),
            "response/length_max": float(max(lengths)),
            "response/truncation_rate": reasons.count("length") / len(reasons),
            "rollout/response_tokens": float(sum(lengths)),
            "rollout/reward_errors": float(self.reward_errors),
        }
        by_source: dict[str, list[float]] = {}
        for g in self.groups:
            by_source.setdefault(g.record.data_source, []).extend(g.rewards)
        for source, values in by_source.items():
            out[f"accuracy/{source}"] = sum(v >= 1.0 for v in values) / len(values)
        return out


async def collect_rollouts(session: SamplingSession, records: Sequence[ProblemRecord],
                           group_size: int, max_response_length: int, temperature: float,
                           top_p: float, seed: int, return_logprob: bool = False) -> RolloutBatch:
    """`group_size` scored samples of every record (T and top_p from the config, seeded);
    with `return_logprob`, the engine's log-prob of every response token too."""
    settings = SamplingSettings(max_new_tokens=max_response_length, temperature=temperature,
                                top_p=top_p, seed=seed)
    prompts = [prompt_token_ids(session.tokenizer, r) for r in records]

    async def sample(p: int, j: int) -> Any:
        params = settings.sampling_params(records[p].uid, j, session.stop_token_ids)
        return await session.router.generate(prompts[p], params, return_logprob=return_logprob,
                                             rid=f"s{seed}-{p}-{j}")

    results = await asyncio.gather(*(sample(p, j) for p in range(len(records))
                                     for j in range(group_size)))
    tasks = [records[k // group_size].reward_task(
                 session.tokenizer.decode(result.output_ids, skip_special_tokens=True),
                 result.finish_reason)
             for k, result in enumerate(results)]
    scores = await asyncio.to_thread(session.pool.map, tasks)
    groups = []
    for p, record in enumerate(records):
        mine = results[p * group_size:(p + 1) * group_size]
        groups.append(Group(record, prompts[p], [list(r.output_ids) for r in mine],
                            [r.finish_reason for r in mine],
                            [float(s) for s in scores[p * group_size:(p + 1) * group_size]],
                            engine_logprobs=[list(r.output_logprobs) for r in mine]
                            if return_logprob else None,
                            weight_versions=[r.weight_version for r in mine]))
    return RolloutBatch(groups, reward_errors=len(session.pool.errors))


def save_rollout(batch: RolloutBatch, path: Path) -> None:
    """Write a batch for a checkpoint, atomically (a crash leaves the previous file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(batch.to_state()))
    partial.replace(path)


def load_rollout(path: Path, records: dict[str, ProblemRecord]) -> RolloutBatch:
    return RolloutBatch.from_state(json.loads(path.read_text()), records)
