"""Shared pieces of the policy tests: a config for a layout, and the transformers oracle."""
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


@torch.no_grad()
def transformers_oracle(hf_dir: Path, sequences: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Logits, per-token log-probs and entropies from transformers in fp64, one sequence at a time."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = []
    for seq in sequences:
        logits = model(torch.tensor([seq])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        out.append({
            "logits": logits,
            "logprob": logp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0],
            "entropy": -(logp.exp() * logp).sum(-1)[:-1],
        })
    return out
