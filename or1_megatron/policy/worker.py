"""One trainer rank of the policy: log-probabilities, training steps and checkpoints.

A plain class, one instance per rank (Ray wraps it in the training loop). Every rank of a
model-parallel group receives the same sequences; the data-parallel split happens before.
Micro-batches are packed by a token budget and run through megatron's pipeline schedule
(forward-only 1F1B for log-probabilities). Log-probabilities and entropy come from the fused
kernel on the final hidden states, so no [tokens, vocab] logits are ever materialised.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from or1_megatron.config.schema import OR1Config
from or1_megatron.convert.hf_config import load_arch, padded_vocab_size
from or1_megatron.convert.qwen2 import Qwen2Mapping
from or1_megatron.kernels import fused_logprob_entropy
from or1_megatron.policy.checkpoint import PolicyState, load_checkpoint, read_metadata, save_checkpoint
from or1_megatron.policy.hf_weights import load_hf_weights
from or1_megatron.policy.model import DTYPES, PolicyGPTModel, build_policy_model
from or1_megatron.policy.packing import PackedMicroBatch, pack, plan_micro_batches
from or1_megatron.policy.parallel import RankLayout, init_parallel

log = logging.getLogger(__name__)

# loss_fn(logprob [t], entropy [t], micro_batch) -> (loss already divided by the global token
# count, {metric name: summed value}). Positions where micro_batch.target_mask is False must not
# contribute to either.
LossFn = Callable[[torch.Tensor, torch.Tensor, PackedMicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class SequenceLogprobs:
    """Per-token results for one sequence: position j predicts token j + 1 (length L - 1)."""

    logprob: torch.Tensor
    entropy: torch.Tensor


def use_fused_torch_adam(optimizer) -> int:
    """Switch megatron's torch AdamW (its choice without transformer-engine or apex) to torch's
    fused kernel; returns how many torch optimizers were switched.

    torch defaults to its foreach kernels on CUDA, which allocate an fp32 temporary the size of
    every parameter at each step (5.7 GiB at 1.5B parameters): a peak of its own after backward.
    The fused kernel updates in place, in one launch per tensor list. TE's and apex's FusedAdam
    are left alone.
    """
    switched = 0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["foreach"], group["fused"] = False, True
                for param in group["params"]:
                    state = inner.state.get(param, {})
                    if "step" in state:  # the fused kernel reads the step count on the param's device
                        state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=param.device)
            switched += 1
    return switched


class PolicyWorker:
    """The policy on one rank: build, load, score, train, checkpoint."""

    def __init__(self, config: OR1Config):
        self.config = config
        self.layout: RankLayout = init_parallel(config.parallel, config.run.seed)
        self.arch = load_arch(config.model.hf_path)
        self.padded_vocab = padded_vocab_size(
            self.arch.vocab_size, config.model.make_vocab_size_divisible_by, config.parallel.tensor_parallel
        )
        self.mapping = Qwen2Mapping(self.arch, self.padded_vocab)
        # Same seed on every rank: CPU initialisation draws the full matrices, then slices them,
        # so a random TP/PP model equals the single-process one.
        torch.manual_seed(config.run.seed)
        self.device = self.layout.device
        model = build_policy_model(
            self.arch, config.model, config.parallel,
            pre_process=self.layout.is_first_stage,
            post_process=self.layout.is_last_stage,
            pp_rank=self.layout.pp_rank,
            device=self.device,
        )
        if config.model.load_weights and not config.model.megatron_checkpoint:
            load_hf_weights(model, config.model.hf_path, self.mapping, self.layout)
        self.model = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=config.parallel.distributed_optimizer,
            ),
            module=model,
        )
        model.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(self._optimizer_config(), [self.model])
        if self.device.type == "cuda":
            use_fused_torch_adam(self.optimizer)
        self.scheduler = self._scheduler(config.optim.lr, config.optim.warmup_steps)
        self.steps_done = 0
        if config.model.megatron_checkpoint:
            self.load_checkpoint(config.model.megatron_checkpoint, with_optimizer=False)
            self.steps_done = 0  # a converted or earlier run's weights start a new run

    def _scheduler(self, lr: float, warmup_steps: int) -> OptimizerParamScheduler:
        """Linear warm-up from 0 over `warmup_steps`, then constant `lr` (sets the rate now)."""
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup_steps else lr,
            max_lr=lr,
            min_lr=lr,
            lr_warmup_steps=warmup_steps,
            lr_decay_steps=max(1, warmup_steps) + 1,
            lr_decay_style="constant",
            start_wd=self.config.optim.weight_decay,
            end_wd=self.config.optim.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )

    def restart_lr_schedule(self, lr: float, warmup_steps: int) -> None:
        """A new schedule from its step 0 (e.g. RL after a supervised warm-up at another rate)."""
        # Megatron's param groups carry their own max_lr/min_lr, which the scheduler prefers.
        for group in self.optimizer.param_groups:
            group["max_lr"] = group["min_lr"] = lr
        self.scheduler = self._scheduler(lr, warmup_steps)

    def _optimizer_config(self) -> OptimizerConfig:
        o = self.config.optim
        return OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=self.config.model.dtype == "bf16",
            params_dtype=DTYPES[self.config.model.dtype],
            use_distributed_optimizer=self.config.parallel.distributed_optimizer,
        )

    # -- helpers ------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> PolicyGPTModel:
        return self.model.module

    def _pad_multiple(self) -> int:
        # Sequence parallelism splits the packed tokens evenly over the TP ranks.
        return self.layout.tp_size if self.config.parallel.sequence_parallel else 1

    def micro_batches(
        self, sequences: list[list[int]], extras: Optional[dict[str, list[torch.Tensor]]] = None
    ) -> list[PackedMicroBatch]:
        """Packed on the host, then moved to this rank's device."""
        plan = plan_micro_batches([len(s) for s in sequences], self.config.batch.micro_batch_tokens)
        return [pack(sequences, idx, self._pad_multiple(), extras).to(self.device) for idx in plan]

    def _token_logprobs(self, micro_batch: PackedMicroBatch, hidden: torch.Tensor, temperature: float):
        """Fused log-prob/entropy of every packed position from the last stage's hidden states."""
        if self.config.parallel.sequence_parallel:
            # The kernel already all-reduces the hidden gradient over TP, so the gather's
            # backward must only split it (not reduce-scatter it a second time).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        hidden = hidden.squeeze(1)
        logprob, entropy = fused_logprob_entropy(
            hidden,
            self.unwrapped.output_weight(),
            micro_batch.targets,
            temperature=temperature,
            tp_group=parallel_state.get_tensor_model_parallel_group() if self.layout.tp_size > 1 else None,
            valid_vocab_size=self.arch.vocab_size,
        )
        mask = micro_batch.target_mask
        return logprob * mask, entropy * mask

    def _run_schedule(self, micro_batches: list[PackedMicroBatch], last_stage_fn, forward_only: bool) -> list:
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(
                input_ids=mb.tokens,
                position_ids=mb.position_ids,
                attention_mask=None,
                packed_seq_params=mb.packed_seq_params,
            )
            return output, partial(last_stage_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.num_tokens for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    # -- public API ---------------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(
        self, sequences: list[list[int]], temperature: float = 1.0
    ) -> Optional[list[SequenceLogprobs]]:
        """Per-token log-probabilities and entropies of `sequences` (token id lists).

        Returns one SequenceLogprobs per sequence (CPU tensors), in input order, on the last
        pipeline stage; None on the other stages.
        """
        micro_batches = self.micro_batches(sequences)

        def collect(mb: PackedMicroBatch, hidden: torch.Tensor):
            logprob, entropy = self._token_logprobs(mb, hidden, temperature)
            return hidden.new_zeros(()), {"mb": mb, "logprob": logprob, "entropy": entropy}

        self.model.eval()
        outputs = self._run_schedule(micro_batches, collect, forward_only=True)
        if not self.layout.is_last_stage:
            return None
        results: list[Optional[SequenceLogprobs]] = [None] * len(sequences)
        for out in outputs:
            mb = out["mb"]
            # One copy to the host per micro-batch (results leave the rank as CPU tensors).
            logprob, entropy = out["logprob"].cpu(), out["entropy"].cpu()
            pairs = zip(mb.split_per_sequence(logprob), mb.split_per_sequence(entropy), strict=True)
            for index, (lp, ent) in zip(mb.indices, pairs, strict=True):
                results[index] = SequenceLogprobs(logprob=lp.clone(), entropy=ent.clone())
        return results  # type: ignore[return-value]

    def train_step(
        self,
        sequences: list[list[int]],
        loss_fn: LossFn,
        extras: Optional[dict[str, list[torch.Tensor]]] = None,
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """One optimizer step over `sequences` (this DP rank's share of the mini-batch).

        `loss_fn` returns each micro-batch's loss already divided by the GLOBAL token count; this
        undoes megatron's per-micro-batch and per-DP-rank averaging, so the gradient is exactly
        that of the token mean over the whole global batch.
        """
        micro_batches = self.micro_batches(sequences, extras)
        undo_averaging = len(micro_batches) * self.layout.dp_size

        def loss_on_last_stage(mb: PackedMicroBatch, hidden: torch.Tensor):
            logprob, entropy = self._token_logprobs(mb, hidden, temperature)
            loss, metrics = loss_fn(logprob, entropy, mb)
            # The schedule divides the returned tensor in place: report detached clones.
            report = {"loss": loss.detach().clone(), **{k: v.detach().clone() for k, v in metrics.items()}}
            return loss * undo_averaging, report

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(micro_batches, loss_on_last_stage, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise FloatingPointError("optimizer step skipped: gradients contain inf/nan")
        self.scheduler.step(increment=1)
        self.steps_done += 1
        metrics = self._reduce_metrics(outputs)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = lr
        return metrics

    def _state(self, with_optimizer: bool) -> PolicyState:
        p = self.config.parallel
        return PolicyState(
            model=self.unwrapped,
            arch=self.arch,
            padded_vocab=self.padded_vocab,
            layout={"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                    "world_size": p.world_size, "dtype": self.config.model.dtype},
            optimizer=self.optimizer if with_optimizer else None,
            scheduler=self.scheduler if with_optimizer else None,
            steps_done=self.steps_done,
        )

    def save_checkpoint(self, directory: str | Path, extra_state: Optional[dict] = None) -> Path:
        """Collective: weights, optimizer, scheduler, step count and `extra_state`."""
        # Before its first step the optimizer has no state to save (and megatron's distributed
        # optimizer cannot describe it): such a checkpoint holds the weights, and resuming from
        # it starts the optimizer fresh, exactly as the run that never stopped had it.
        return save_checkpoint(self._state(with_optimizer=self.steps_done > 0), directory,
                               extra_state, carried_from=self.config.model.hf_path or None)

    def load_checkpoint(self, directory: str | Path, with_optimizer: bool = True) -> dict:
        """Collective: restore from any TP/PP/DP layout (the optimizer too, when the checkpoint
        has its state); returns the saved `extra_state`."""
        with_optimizer = with_optimizer and read_metadata(directory).get("with_optimizer", False)
        state = self._state(with_optimizer)
        extra = load_checkpoint(state, directory)
        self.steps_done = state.steps_done
        if with_optimizer:
            self._apply_configured_lr(directory)
            if self.device.type == "cuda":  # the loaded param groups and step counts, too
                use_fused_torch_adam(self.optimizer)
        return extra

    def _apply_configured_lr(self, directory: str | Path) -> None:
        """The optimizer state restores the rate it was saved with; a resumed run whose config
        changed optim.lr must train at the new rate, and say so."""
        lr = self.config.optim.lr
        saved = {group.get("max_lr") for group in self.optimizer.param_groups}
        if saved == {lr}:
            return
        if self.layout.rank == 0:
            log.warning("%s was saved with learning rate %s; optim.lr=%s now applies",
                        directory, sorted(saved), lr)
        for group in self.optimizer.param_groups:
            group["max_lr"] = group["min_lr"] = lr
        self.scheduler.max_lr = self.scheduler.min_lr = lr
        self.scheduler.step(increment=0)  # sets the rate of every group now

    def _reduce_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum each metric over micro-batches and DP ranks; broadcast from the last PP stage."""
        names = sorted(outputs[0]) if outputs else []
        # On the rank's device: NCCL groups take only CUDA tensors. One host copy at the end.
        if names:
            local = torch.stack([sum(o[n].detach().to(self.device, torch.float64) for o in outputs)
                                 for n in names])
        else:
            local = torch.zeros(0, dtype=torch.float64, device=self.device)
        names_obj = [names]
        # Only the last stage computed losses; every rank returns the same numbers.
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        torch.distributed.broadcast_object_list(names_obj, src=last, group=pp_group)
        names = names_obj[0]
        if local.numel() != len(names):
            local = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(local, src=last, group=pp_group)
        torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
        return {n: float(v) for n, v in zip(names, local.tolist(), strict=True)}
