"""The knobs of a run that decide its memory and speed, read from a config and written back.

`Layout` is what the planner varies when a plan does not fit (TP, PP, recompute, micro-batch
tokens, the engines' memory fraction, the GPU count), and `overrides` turns a changed layout
into the `key=value` arguments that `or1 train`, `or1 config` and the planner accept.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from or1_megatron.config.schema import OR1Config
from or1_megatron.convert.hf_config import padded_vocab_size

# Layout field -> the config key it is read from and written to.
CONFIG_KEYS = {
    "tensor_parallel": "parallel.tensor_parallel",
    "pipeline_parallel": "parallel.pipeline_parallel",
    "context_parallel": "parallel.context_parallel",
    "world_size": "parallel.world_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "distributed_optimizer": "parallel.distributed_optimizer",
    "recompute": "model.recompute",
    "micro_batch_tokens": "batch.micro_batch_tokens",
    "placement": "rollout.placement",
    "engines": "rollout.engines",
    "engine_tp": "rollout.engine_tp",
    "mem_fraction": "rollout.mem_fraction",
    "transport": "sync.transport",
}


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    world_size: int
    sequence_parallel: bool
    distributed_optimizer: bool
    recompute: str                # a RECOMPUTE_MODES value
    micro_batch_tokens: int
    placement: str
    engines: int
    engine_tp: int
    mem_fraction: float
    transport: str
    vocab_divisible_by: int = 128
    max_prompt_length: int = 2048

    @classmethod
    def from_config(cls, cfg: OR1Config) -> "Layout":
        p, r = cfg.parallel, cfg.rollout
        return cls(
            tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
            context_parallel=p.context_parallel, world_size=p.world_size,
            sequence_parallel=p.sequence_parallel, distributed_optimizer=p.distributed_optimizer,
            recompute=cfg.model.recompute, micro_batch_tokens=cfg.batch.micro_batch_tokens,
            placement=r.placement, engines=r.engines, engine_tp=r.engine_tp,
            mem_fraction=r.mem_fraction, transport=cfg.sync.transport,
            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
            max_prompt_length=cfg.batch.max_prompt_length,
        )

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def engine_gpus(self) -> int:
        return self.engines * self.engine_tp

    def gpus_needed(self) -> int:
        """Colocated engines share the trainer's GPUs; disaggregated ones need their own."""
        if self.placement == "colocated":
            return max(self.world_size, self.engine_gpus)
        return self.world_size + self.engine_gpus

    def padded_vocab(self, vocab_size: int) -> int:
        return padded_vocab_size(vocab_size, self.vocab_divisible_by, self.tensor_parallel)

    def overrides(self, base: "Layout") -> list[str]:
        """`key=value` for every knob that differs from `base`."""
        out = []
        for f in fields(self):
            key = CONFIG_KEYS.get(f.name)
            value = getattr(self, f.name)
            if key is not None and value != getattr(base, f.name):
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out
