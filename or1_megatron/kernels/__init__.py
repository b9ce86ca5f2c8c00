"""Fused kernels of the policy update: vocab-parallel logprob + entropy, and the PPO policy loss.

Public API:

- `fused_logprob_entropy(hidden, weight, targets, ...)`: log-probability of the targets and the
  full-vocabulary entropy from the final hidden states, without materialising ``[T, V_local]``
  logits (Triton row kernels on CUDA, chunked torch elsewhere; see `logprob.py`);
- `policy_loss(logprob, old_logprob, advantages, response_mask, ...)`: the token-level PPO
  clipped surrogate with clip-higher, dual clip and entropy bonus, and its metrics, in one pass;
- `naive_logprob_entropy` / `oracle_logprob_entropy`: the unfused baseline and the fp64 oracle.

This package lives under ``or1_megatron`` on purpose: a top-level ``kernels`` package would
shadow Hugging Face's PyPI ``kernels``, which transformers imports.
"""
from or1_megatron.kernels.logprob import fused_logprob_entropy, triton_available
from or1_megatron.kernels.policy_loss import policy_loss
from or1_megatron.kernels.reference import naive_logprob_entropy, oracle_logprob_entropy

__all__ = [
    "fused_logprob_entropy",
    "naive_logprob_entropy",
    "oracle_logprob_entropy",
    "policy_loss",
    "triton_available",
]
