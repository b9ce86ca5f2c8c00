"""Estimated time of one RL step (rollout, old log-probabilities, training, weight sync).

Each phase is its FLOPs or bytes over a datasheet peak times an efficiency factor
(plan.hardware), so every figure can be traced to one formula:

  forward FLOPs per token = 2 x matmul parameters + 4 x layers x hidden x attended tokens
    (causal attention over a sequence of L tokens attends L/2 tokens on average)
  logprob  = forward FLOPs of every token / (GPUs x peak x forward_mfu) x pipeline bubble
             + tensor-parallel all-gather/reduce-scatter bytes / NVLink
  train    = (3 + recomputed share) x forward FLOPs / (GPUs x peak x train_mfu) x bubble, the
             recomputed share being 0 (recompute none), the MLP's share of the forward FLOPs
             (selective) or 1 (full)
             + TP bytes / NVLink + per optimizer step the distributed optimizer's
               reduce-scatter (fp32 grads) and all-gather (bf16 params) over NVLink or IB
  rollout  = prefill FLOPs + decode steps x max(weights + KV read, decode FLOPs) per step,
             where an engine decodes as many sequences at once as its KV cache holds and the
             rollout lasts at least one max-length response (the long tail at T=1)
  sync     = a fixed cost (pause, flush, verify) + gathering the TP shards into full tensors
             + moving the bf16 weights to the engines over NVLink (colocated), IB (distributed)
             or the filesystem (disk)
Strictly on-policy: the phases run one after another, so the step time is their sum.
"""
from __future__ import annotations

from dataclasses import dataclass

from or1_megatron.config.stages import Stage
from or1_megatron.convert.hf_config import Qwen2Arch
from or1_megatron.plan.engine_memory import EngineMemory
from or1_megatron.plan.hardware import GPU, Efficiency
from or1_megatron.plan.layout import Layout

GB = 1e9


@dataclass(frozen=True)
class Workload:
    """What the config cannot say: how long prompts and responses really are."""

    mean_prompt_tokens: int = 512
    # Mean response length as a fraction of the stage's max_response_length.
    response_fill: float = 0.5

    def response_tokens(self, stage: Stage) -> float:
        return self.response_fill * stage.max_response_length


@dataclass(frozen=True)
class StepTime:
    rollout: float
    logprob: float
    train: float
    sync: float
    tokens: float              # prompt + response tokens of one rollout batch
    decode_concurrency: int    # sequences one engine decodes at once
    decode_steps: int

    @property
    def total(self) -> float:
        """algo.mode=sync: every phase in turn."""
        return self.rollout + self.logprob + self.train + self.sync

    @property
    def one_step_off_total(self) -> float:
        """algo.mode=one_step_off: the next batch's rollout runs during this step's log-probs and
        training, with the same per-phase times (a bound: it needs disaggregated placement, so
        each side would have only its share of the GPUs)."""
        return max(self.rollout, self.logprob + self.train) + self.sync

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total


def matmul_params(arch: Qwen2Arch, total_params: int, padded_vocab: int) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup). With tied
    embeddings the one [vocab, hidden] matrix is counted once in `total_params` and is the output
    layer's matmul, so nothing is taken off."""
    if arch.tie_word_embeddings:
        return total_params
    return total_params - padded_vocab * arch.hidden_size


def forward_flops_per_token(arch: Qwen2Arch, matmul: int, attended: float) -> float:
    return 2 * matmul + 4 * arch.num_layers * arch.num_attention_heads * arch.head_dim * attended


def _bubble(tokens_per_rank: float, micro_batch_tokens: int, pp: int) -> float:
    """1F1B pipeline bubble: (m + pp - 1) / m for m micro-batches per flush."""
    micro_batches = max(1.0, tokens_per_rank / micro_batch_tokens)
    return (micro_batches + pp - 1) / micro_batches


def _tp_seconds(arch: Qwen2Arch, layout: Layout, tokens: float, collectives_per_layer: int,
                gpu: GPU, eff: Efficiency) -> float:
    """Sequence-parallel all-gathers / reduce-scatters of [tokens, hidden] bf16 activations."""
    tp = layout.tensor_parallel
    if tp == 1:
        return 0.0
    per_rank = tokens / (layout.data_parallel * layout.context_parallel)
    layers = arch.num_layers / layout.pipeline_parallel
    moved = collectives_per_layer * layers * per_rank * arch.hidden_size * 2 * (tp - 1) / tp
    return moved / (gpu.nvlink_gbps * GB * eff.nvlink)


def _dp_link_gbps(layout: Layout, gpu: GPU, eff: Efficiency) -> float:
    # Megatron orders ranks tp-cp-dp-pp: a DP group stays in a node while tp x cp x dp fits in it.
    within = layout.tensor_parallel * layout.context_parallel * layout.data_parallel <= gpu.gpus_per_node
    return gpu.nvlink_gbps * eff.nvlink if within else gpu.ib_gbps * eff.ib


def rollout_seconds(arch: Qwen2Arch, layout: Layout, stage: Stage, gpu: GPU, eff: Efficiency,
                    workload: Workload, engine: EngineMemory, matmul: int) -> tuple[float, int, int]:
    """(seconds, sequences decoded at once per engine, decode steps)."""
    prompt, response = workload.mean_prompt_tokens, workload.response_tokens(stage)
    per_engine = -(-stage.rollout_prompts * stage.group_size // layout.engines)
    concurrency = max(1, min(per_engine, int(engine.kv_tokens // (prompt + response))))
    steps = int(max(stage.max_response_length, -(-per_engine * response // concurrency)))
    peak = gpu.bf16_tflops * 1e12
    kv_read = concurrency * (prompt + response / 2) * engine.kv_bytes_per_token
    memory_bound = (engine.weights + kv_read) / (gpu.hbm_gbps * GB * eff.decode_hbm)
    compute_bound = 2 * matmul / layout.engine_tp * concurrency / (peak * eff.prefill_mfu)
    latency = 2 * arch.num_layers * eff.decode_step_latency_us * 1e-6 if layout.engine_tp > 1 else 0.0
    prefill = (per_engine * prompt * forward_flops_per_token(arch, matmul, prompt / 2)
               / (layout.engine_tp * peak * eff.prefill_mfu))
    return prefill + steps * (max(memory_bound, compute_bound) + latency), concurrency, steps


def sync_seconds(layout: Layout, gpu: GPU, eff: Efficiency, total_params: int) -> float:
    weights = 2 * total_params
    nvlink, ib = gpu.nvlink_gbps * GB * eff.nvlink, gpu.ib_gbps * GB * eff.ib
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    gather = eff.sync_fixed_s + weights / pp * (tp - 1) / tp / nvlink
    if layout.transport == "disk":
        # one writer; every engine reads the whole checkpoint through the shared filesystem
        return gather + weights * (1 + layout.engines) / (eff.disk_gbps * GB)
    if layout.transport == "distributed":
        # one sender per pipeline stage broadcasts its layers to the engines over IB
        return gather + weights / pp / ib
    # colocated: each engine GPU takes its shard from a trainer GPU on its node; layers held by
    # pipeline stages on other nodes cross IB.
    shard = weights / layout.engine_tp
    remote = 0.0
    if tp * pp > gpu.gpus_per_node:
        remote = shard * (pp - 1) / pp / ib
    return gather + shard / nvlink + remote


def recomputed_share(arch: Qwen2Arch, recompute: str, matmul: int, attended: float) -> float:
    """The fraction of a forward pass that activation recompute runs again in backward."""
    if recompute == "full":
        return 1.0
    if recompute == "selective":
        mlp = 2 * 3 * arch.hidden_size * arch.ffn_hidden_size * arch.num_layers
        return mlp / forward_flops_per_token(arch, matmul, attended)
    return 0.0


def step_time(arch: Qwen2Arch, layout: Layout, stage: Stage, gpu: GPU, eff: Efficiency,
              workload: Workload, engine: EngineMemory, total_params: int,
              params_per_rank: int) -> StepTime:
    padded = layout.padded_vocab(arch.vocab_size)
    matmul = matmul_params(arch, total_params, padded)
    prompt, response = workload.mean_prompt_tokens, workload.response_tokens(stage)
    sequences = stage.rollout_prompts * stage.group_size
    tokens = sequences * (prompt + response)
    forward = tokens * forward_flops_per_token(arch, matmul, (prompt + response) / 2)
    cluster_peak = layout.world_size * gpu.bf16_tflops * 1e12
    pp, mbt = layout.pipeline_parallel, layout.micro_batch_tokens
    per_rank = tokens / layout.data_parallel

    logprob = (forward / (cluster_peak * eff.forward_mfu) * _bubble(per_rank, mbt, pp)
               + _tp_seconds(arch, layout, tokens, 4, gpu, eff))
    passes = 3 + recomputed_share(arch, layout.recompute, matmul, (prompt + response) / 2)
    sgd = stage.sgd_steps
    dp_bytes = params_per_rank * (4 + 2) * (layout.data_parallel - 1) / max(layout.data_parallel, 1)
    train = (passes * forward / (cluster_peak * eff.train_mfu) * _bubble(per_rank / sgd, mbt, pp)
             + _tp_seconds(arch, layout, tokens, 4 * passes - 4, gpu, eff)
             + sgd * dp_bytes / (_dp_link_gbps(layout, gpu, eff) * GB))
    rollout, concurrency, steps = rollout_seconds(arch, layout, stage, gpu, eff, workload, engine, matmul)
    return StepTime(rollout=rollout, logprob=logprob, train=train,
                    sync=sync_seconds(layout, gpu, eff, total_params), tokens=tokens,
                    decode_concurrency=concurrency, decode_steps=steps)
