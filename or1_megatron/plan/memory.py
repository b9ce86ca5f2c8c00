"""Per-GPU memory of the Megatron policy at a TP x PP x DP layout, from the model's shapes.

Owns the arithmetic only (bytes per parameter, per token); the planner tool adds the GPU,
the rollout engines and step time on top. Every figure is for the most loaded pipeline stage
and is derived from the same Qwen2 mapping the model is built from, so a 7B or 32B plan uses
the exact parameter counts (7,615,616,512 and 32,763,876,352) split the way megatron splits them.

Bytes per parameter (bf16 training with megatron's DDP and distributed optimizer):
  weights 2 (bf16) | gradient buffer 4 (fp32 reduce) | optimizer 12 / DP (fp32 master copy and
  Adam's two moments, sharded over the data-parallel ranks; unsharded 12 without it).
Activations per token per layer (bf16, flash attention, no dropout), divided by TP under
sequence parallelism: the tensors saved for backward are the two norm inputs and outputs
(4h), q/k/v (h + 2 kv_dim), the attention output (h), the MLP's gate/up output (2f) and its
SwiGLU output (f): 2 bytes x (6h + 2 kv_dim + 3f). Full recompute keeps only each layer's input
(2h) plus one layer's full set while it is recomputed. With 1F1B the first stage holds PP
micro-batches in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

from or1_megatron.convert.hf_config import Qwen2Arch
from or1_megatron.convert.qwen2 import Qwen2Mapping

GIB = 1024**3


def stage_params_per_rank(arch: Qwen2Arch, tp: int, pp: int, padded_vocab: int) -> list[int]:
    """Parameters one TP rank of each pipeline stage holds (replicated norms counted on each)."""
    mapping = Qwen2Mapping(arch, padded_vocab)
    counts = []
    for stage in range(pp):
        total = 0
        for entry in mapping.stage_entries(stage, pp):
            numel = 1
            for dim in mapping.mcore_shard_shape(entry, tp):
                numel *= dim
            total += numel
        counts.append(total)
    return counts


def activation_bytes_per_token_layer(arch: Qwen2Arch) -> int:
    """bf16 activations one layer saves for backward, per token, before any TP split."""
    kv_dim = arch.num_key_value_heads * arch.head_dim
    return 2 * (6 * arch.hidden_size + 2 * kv_dim + 3 * arch.ffn_hidden_size)


@dataclass(frozen=True)
class PolicyMemory:
    """Bytes per GPU on the most loaded pipeline stage."""

    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    def rows(self) -> list[tuple[str, float]]:
        return [("weights (bf16)", self.weights / GIB), ("gradients (fp32)", self.grads / GIB),
                ("optimizer states", self.optimizer / GIB), ("activations", self.activations / GIB),
                ("logits / loss", self.logits / GIB), ("total", self.total / GIB)]


def policy_memory(
    arch: Qwen2Arch,
    *,
    tp: int,
    pp: int,
    dp: int,
    micro_batch_tokens: int,
    padded_vocab: int,
    recompute: bool,
    sequence_parallel: bool = True,
    distributed_optimizer: bool = True,
    fused_logprob: bool = True,
    logprob_chunk_tokens: int = 4096,
) -> PolicyMemory:
    """Memory of one policy rank while it trains on micro-batches of `micro_batch_tokens` tokens."""
    per_stage = stage_params_per_rank(arch, tp, pp, padded_vocab)
    params = max(per_stage)
    optimizer_per_param = 12 / dp if distributed_optimizer else 12
    layers = arch.num_layers // pp
    split = tp if sequence_parallel else 1
    per_layer = activation_bytes_per_token_layer(arch) * micro_batch_tokens // split
    if recompute:
        checkpoints = 2 * arch.hidden_size * micro_batch_tokens // split * layers
        one_stage_mb = checkpoints + per_layer
    else:
        one_stage_mb = per_layer * layers
    in_flight = pp  # 1F1B: the first stage holds pp micro-batches before its first backward
    vocab_local = padded_vocab // tp
    # fp32 [tokens, vocab/TP] logits plus their gradient when unfused; one chunk when fused.
    logit_tokens = min(micro_batch_tokens, logprob_chunk_tokens) if fused_logprob else micro_batch_tokens
    logits = 2 * 4 * logit_tokens * vocab_local
    return PolicyMemory(
        params=params,
        weights=2 * params,
        grads=4 * params,
        optimizer=int(optimizer_per_param * params),
        activations=one_stage_mb * in_flight,
        logits=logits,
    )
