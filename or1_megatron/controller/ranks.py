"""What runs on each policy rank: the functions the driver calls through the rank group.

Every function takes the rank's `PolicyRank` state first and is called on all ranks at once
(each is collective over the trainer's process groups). The driver sends every rank the whole
mini-batch; each data-parallel replica takes its own token-balanced share (batch.py), so no
rank-to-rank data movement is needed. Results come back from the last pipeline stage's
TP-rank-0 member of each replica only (None elsewhere). This module owns no loop logic.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from or1_megatron.config.schema import OR1Config
from or1_megatron.controller.batch import TrainBatch, response_mask, split_over_data_parallel

if TYPE_CHECKING:  # megatron is imported on the ranks only: the driver never needs it
    from or1_megatron.policy.worker import PolicyWorker
    from or1_megatron.sync.plan import PushPlan, PushReport
    from or1_megatron.sync.sender import WeightSender


@dataclass
class PolicyRank:
    worker: "PolicyWorker"
    sender: "WeightSender"

    @property
    def reports(self) -> bool:
        """The rank whose results the driver reads for its data-parallel replica."""
        layout = self.worker.layout
        return layout.is_last_stage and layout.tp_rank == 0

    def my_share(self, lengths: list[int], indices: list[int]) -> list[int]:
        layout = self.worker.layout
        return split_over_data_parallel(lengths, indices, layout.dp_size)[layout.dp_rank]


def setup_policy_rank(rank: int, world_size: int, config: OR1Config) -> PolicyRank:
    """Build this rank's policy (joins the process group from RANK/WORLD_SIZE/MASTER_* env)."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # 2 threads per rank made a TP2 step 20x slower on 2 cores
    from or1_megatron.policy.worker import PolicyWorker
    from or1_megatron.sync.sender import WeightSender

    return PolicyRank(worker=PolicyWorker(config), sender=WeightSender())


def old_logprobs(state: PolicyRank, sequences: list[list[int]]
                 ) -> Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """{sample index: (log-probabilities, entropies)} of this replica's share of `sequences`."""
    lengths = [len(s) for s in sequences]
    share = state.my_share(lengths, list(range(len(sequences))))
    results = state.worker.compute_logprobs([sequences[i] for i in share])
    if not state.reports or results is None:
        return None
    return {i: (r.logprob, r.entropy) for i, r in zip(share, results)}


def _share_or_placeholder(state: PolicyRank, lengths: list[int], indices: list[int]
                          ) -> tuple[list[int], bool]:
    """This replica's share of `indices`, or (when there are more replicas than samples) one
    sample to run with its mask zeroed: it adds exactly nothing to loss or gradient but keeps
    the collectives of the step in line. The flag says which."""
    share = state.my_share(lengths, indices)
    return (share, False) if share else ([indices[0]], True)


def train_policy(state: PolicyRank, batch: TrainBatch, indices: list[int], entropy_coef: float,
                 clip_low: float, clip_high: float, dual_clip: float) -> dict[str, float]:
    """One optimizer step on the mini-batch `indices`: the token mean over all its response
    tokens on all replicas (the loss of each micro-batch is divided by that global count)."""
    from or1_megatron.kernels import policy_loss

    global_tokens = batch.response_tokens(indices)
    share, placeholder = _share_or_placeholder(state, [len(s) for s in batch.sequences], indices)
    extras = batch.extras(share)
    if placeholder:
        extras["response_mask"] = [torch.zeros_like(m) for m in extras["response_mask"]]

    def loss_fn(logprob, entropy, mb):
        return policy_loss(
            logprob, mb.extras["old_logprob"], mb.extras["advantages"], mb.extras["response_mask"],
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip or None,
            entropy=entropy, entropy_coef=entropy_coef, global_token_count=global_tokens,
            is_weight=mb.extras.get("is_weight"))

    return state.worker.train_step([batch.samples[i].sequence for i in share], loss_fn, extras)


def train_supervised(state: PolicyRank, sequences: list[list[int]], prompt_lengths: list[int]
                     ) -> dict[str, float]:
    """One warm-up step: mean negative log-likelihood of the response tokens over all replicas."""
    global_tokens = sum(len(s) - p for p, s in zip(prompt_lengths, sequences))
    share, placeholder = _share_or_placeholder(state, [len(s) for s in sequences],
                                               list(range(len(sequences))))
    masks = [response_mask(prompt_lengths[i], len(sequences[i])) for i in share]
    if placeholder:
        masks = [torch.zeros_like(m) for m in masks]

    def loss_fn(logprob, entropy, mb):
        mask = mb.extras["response_mask"]
        nll = -(logprob * mask).sum()
        return nll / global_tokens, {"tokens": mask.sum(), "nll_sum": nll.detach()}

    return state.worker.train_step([sequences[i] for i in share], loss_fn, {"response_mask": masks})


def restart_lr_schedule(state: PolicyRank, lr: float, warmup_steps: int) -> None:
    state.worker.restart_lr_schedule(lr, warmup_steps)


def release_cached_memory(state: PolicyRank) -> None:
    """Give the GPU memory torch caches but no tensor uses back to the device, so a colocated
    engine resuming its weights and KV cache finds it free (nothing to do on CPU)."""
    device = state.worker.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def push_weights(state: PolicyRank, plan: "PushPlan") -> "PushReport":
    return state.sender.push(state.worker, plan)


def score_sequences(state: PolicyRank, sequences: list[list[int]]) -> Optional[list[list[float]]]:
    """Log-probabilities of whole sequences on one replica (the weight-sync probe)."""
    if state.worker.layout.dp_rank != 0:  # forward passes have no data-parallel collectives
        return None
    results = state.worker.compute_logprobs(sequences)
    return None if results is None or not state.reports else [r.logprob.tolist() for r in results]


def save_checkpoint(state: PolicyRank, directory: str, extra_state: dict) -> str:
    return str(state.worker.save_checkpoint(directory, extra_state))


def write_hf_shards(state: PolicyRank, staging: str, max_shard_bytes: int) -> Optional[dict]:
    """This stage's HF tensors as safetensors files under `staging`, written by the stage's TP
    rank 0 of the first data-parallel replica (the others hold the same weights and skip)."""
    from or1_megatron.convert.hf_export import write_stage_shards
    from or1_megatron.policy.model import DTYPES

    worker, layout = state.worker, state.worker.layout
    if layout.dp_rank != 0:
        return None
    return write_stage_shards(worker.unwrapped, worker.mapping, layout, staging, max_shard_bytes,
                              DTYPES[worker.config.model.dtype], writer=layout.tp_rank == 0,
                              progress_label=f"hf export stage {layout.pp_rank} tensors")


def load_checkpoint(state: PolicyRank, directory: str) -> dict:
    return state.worker.load_checkpoint(directory)
