"""Small random Qwen2 checkpoints in Hugging Face format, built from a config on the spot.

Tests, the CPU demo and the benchmarks use these instead of downloading anything: the same code
paths as DeepSeek-R1-Distill-Qwen (Qwen2ForCausalLM), at a size two CPU cores handle.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_qwen2_dict(
    *,
    vocab_size: int = 300,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
) -> dict:
    """The config.json fields of a small Qwen2ForCausalLM (defaults: ~100K parameters)."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "rope_theta": rope_theta, "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
    }


def tiny_qwen2_config(**shape):
    """A transformers Qwen2Config with the given shape (the arguments of `tiny_qwen2_dict`)."""
    from transformers import Qwen2Config

    fields = tiny_qwen2_dict(**shape)
    architectures = fields.pop("architectures")
    fields.pop("model_type")
    rename = {"num_layers": "num_hidden_layers"}
    config = Qwen2Config(**{rename.get(k, k): v for k, v in fields.items()})
    config.architectures = architectures
    return config


def make_tiny_qwen2(out_dir: str | Path, seed: int = 0, init_std: float | None = 0.2, **shape) -> Path:
    """Write a random fp32 Qwen2ForCausalLM (config.json + model.safetensors) to `out_dir`.

    By default weights are drawn with a wider std than transformers' 0.02 so that logits, and so
    log-probabilities and gradients, differ visibly between tokens in tests; `init_std=None`
    keeps transformers' initialisation (a model that is going to be trained).
    """
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_qwen2_config(**shape)).float()
    if init_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.endswith("norm.weight"):
                    param.normal_(0.0, init_std)
                else:
                    param.uniform_(0.5, 1.5)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
