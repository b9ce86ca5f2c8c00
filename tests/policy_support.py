"""Shared pieces of the policy tests: a config for a layout and random sequences."""
from __future__ import annotations

from pathlib import Path

import torch

from or1_megatron.config import OR1Config, load_config


def policy_config(hf_dir: Path, tp: int = 1, pp: int = 1, world: int = 1, **overrides) -> OR1Config:
    settings = {
        "model.hf_path": str(hf_dir),
        "model.dtype": "fp32",
        "parallel.tensor_parallel": tp,
        "parallel.pipeline_parallel": pp,
        "parallel.world_size": world,
        # Small budget: the test sequences are spread over several packed micro-batches.
        "batch.micro_batch_tokens": 24,
        "batch.max_prompt_length": 8,
        "batch.max_response_length": 16,
        "batch.rollout_prompts": 4,
        "batch.mini_batch_prompts": 4,
        "batch.group_size": 2,
        "optim.lr": 1e-3,
        # A large eps keeps Adam's update a smooth function of the gradient, so float
        # reassociation across layouts stays at round-off level in the updated weights.
        "optim.adam_eps": 1e-4,
        **overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def random_sequences(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
