"""Per-GPU memory of one SGLang rollout engine: its weights and the KV cache mem_fraction leaves.

SGLang reserves `--mem-fraction-static` of the GPU's memory for the model weights plus the KV
cache pool; whatever the weights do not take is KV cache. Owns that split and the KV bytes per
token, nothing about time.
"""
from __future__ import annotations

from dataclasses import dataclass

from or1_megatron.convert.hf_config import Qwen2Arch


def kv_bytes_per_token(arch: Qwen2Arch, engine_tp: int) -> int:
    """bf16 K and V of every layer for one token, on one GPU of an engine.

    KV heads split over the engine's TP ranks; past num_key_value_heads they are replicated.
    """
    heads_per_gpu = -(-arch.num_key_value_heads // engine_tp)
    return 2 * arch.num_layers * heads_per_gpu * arch.head_dim * 2


@dataclass(frozen=True)
class EngineMemory:
    """Bytes on one GPU of one engine."""

    static: int               # mem_fraction x GPU memory: weights + KV pool
    weights: int
    kv_bytes_per_token: int

    @property
    def kv_cache(self) -> int:
        return self.static - self.weights

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV pool holds (0 when the weights alone exceed the static budget)."""
        return max(self.kv_cache, 0) // self.kv_bytes_per_token


def engine_memory(arch: Qwen2Arch, total_params: int, *, engine_tp: int, mem_fraction: float,
                  gpu_memory: int) -> EngineMemory:
    # Every matrix and the vocabulary split over the engine's TP ranks; the replicated norms
    # are under 0.01% of the weights.
    weights = 2 * -(-total_params // engine_tp)
    return EngineMemory(static=int(mem_fraction * gpu_memory), weights=weights,
                        kv_bytes_per_token=kv_bytes_per_token(arch, engine_tp))
