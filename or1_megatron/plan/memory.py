"""Per-GPU memory of the Megatron policy at a TP x PP x DP layout, from the model's shapes.

Owns the arithmetic only (bytes per parameter, per token); the planner tool adds the GPU,
the rollout engines and step time on top. Every figure is for the most loaded pipeline stage
and is derived from the same Qwen2 mapping the model is built from, so a 7B or 32B plan uses
the exact parameter counts (7,615,616,512 and 32,763,876,352) split the way megatron splits them.

Bytes per parameter (bf16 training with megatron's DDP and distributed optimizer):
  weights 2 (bf16) | gradient buffer 4 (fp32 reduce) | optimizer 12 / DP (fp32 master copy and
  Adam's two moments, sharded over the data-parallel ranks; unsharded 12 without it).
Activations per token per layer (bf16, the local spec's fused norms and SwiGLU, varlen flash
attention, no dropout), divided by TP under sequence parallelism; `plan.measure` counts the same
thing on a real forward and the tests hold this arithmetic to it:
  - recompute none: the two norms' inputs and outputs (4h), the rotated q and k (h + kv), the
    q/k/v projection output that v is a view of (h + 2 kv), the attention output (h), the gate/up
    projection (2f) and the SwiGLU output (f): 2 bytes x (7h + 3 kv + 3f), plus fp32 per token
    the norms' 1/rms (2) and attention's log-sum-exp (one per head);
  - selective (norms and MLP recomputed): the norms' inputs (2h) and the attention tensors:
    2 bytes x (5h + 3 kv) plus the log-sum-exp; while one layer's MLP is recomputed in backward
    it holds that layer's norm output, gate/up and SwiGLU output again (h + 3f);
  - full: each layer's input (2h), plus one layer's full set while it is recomputed.
With 1F1B the first stage holds PP micro-batches in flight.
The fused log-prob kernel holds one fp32 chunk of logits (at most 2**25 elements), its bf16
gradient and the fp32 [tokens, h] hidden-gradient accumulator; the output layer's bf16 weight
gradient exists until megatron adds it into the fp32 buffer.
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


def _attention_bytes_per_token(arch: Qwen2Arch) -> int:
    h, kv = arch.hidden_size, arch.num_key_value_heads * arch.head_dim
    return 2 * ((h + kv) + (h + 2 * kv) + h) + 4 * arch.num_attention_heads


def activation_bytes_per_token_layer(arch: Qwen2Arch, recompute: str = "none") -> int:
    """bf16 activations one layer keeps for backward, per token, before any TP split."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    if recompute == "none":
        return 2 * (4 * h + 3 * f) + 4 * 2 + _attention_bytes_per_token(arch)
    if recompute == "selective":
        return 2 * 2 * h + _attention_bytes_per_token(arch)
    if recompute == "full":
        return 2 * h
    raise ValueError(f"recompute must be one of none, selective, full; got {recompute!r}")


def recompute_transient_bytes_per_token(arch: Qwen2Arch, recompute: str) -> int:
    """What one layer holds again while its recomputed part runs in backward, per token."""
    if recompute == "full":
        return activation_bytes_per_token_layer(arch, "none")
    if recompute == "selective":
        return 2 * (arch.hidden_size + 3 * arch.ffn_hidden_size)
    return 0


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
    recompute: str,
    sequence_parallel: bool = True,
    distributed_optimizer: bool = True,
    fused_logprob: bool = True,
    logprob_chunk_elems: int = 1 << 25,
) -> PolicyMemory:
    """Memory of one policy rank while it trains on micro-batches of `micro_batch_tokens` tokens."""
    per_stage = stage_params_per_rank(arch, tp, pp, padded_vocab)
    params = max(per_stage)
    optimizer_per_param = 12 / dp if distributed_optimizer else 12
    layers = arch.num_layers // pp
    split = tp if sequence_parallel else 1
    per_layer = activation_bytes_per_token_layer(arch, recompute) * micro_batch_tokens // split
    transient = recompute_transient_bytes_per_token(arch, recompute) * micro_batch_tokens // split
    in_flight = pp  # 1F1B: the first stage holds pp micro-batches before its first backward
    vocab_local = padded_vocab // tp
    if fused_logprob:
        # one fp32 chunk of logits and its bf16 gradient, the fp32 hidden-gradient accumulator
        chunk = min(micro_batch_tokens * vocab_local, logprob_chunk_elems)
        logits = (4 + 2) * chunk + 4 * micro_batch_tokens * arch.hidden_size
    else:
        logits = 2 * 4 * micro_batch_tokens * vocab_local  # fp32 [tokens, vocab/TP] and its gradient
    logits += 2 * vocab_local * arch.hidden_size  # the output layer's bf16 weight gradient
    return PolicyMemory(
        params=params,
        weights=2 * params,
        grads=4 * params,
        optimizer=int(optimizer_per_param * params),
        activations=per_layer * layers * in_flight + transient,
        logits=logits,
    )
