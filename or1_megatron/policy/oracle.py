"""The numerical reference for the policy: `transformers` in fp64, one sequence at a time.

`or1 check` and the tests compare the Megatron policy (any layout) against it.
"""
from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def transformers_oracle(hf_dir: str | Path, sequences: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Logits, per-token log-probs and entropies of each sequence (position j predicts token j+1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
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
