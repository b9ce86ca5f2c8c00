"""Typed run configuration, grouped by component.

Each dataclass is one component's options; OmegaConf uses them as the schema, so an unknown key
or a wrong type in a YAML file or a command-line override is an error before anything starts.
Cross-field rules (parallel layout vs. model shape, batch divisibility) live in
`config.validate`, not here. This module must stay import-light: no torch, no megatron.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # Directory holding a Hugging Face config.json (and, optionally, safetensors weights).
    hf_path: str = MISSING
    # Load the safetensors weights found in hf_path; False builds random weights (tests, demo).
    load_weights: bool = True
    # A Megatron dist checkpoint to take the initial weights from instead (e.g. the output of
    # `or1 convert hf-to-mcore`); any TP/PP layout.
    megatron_checkpoint: str = ""
    # Parameter and compute dtype of the policy: fp32 or bf16.
    dtype: str = "bf16"
    # The vocabulary is padded to a multiple of lcm(this, TP) rows (TP-independent when TP divides it).
    make_vocab_size_divisible_by: int = 128
    # Full activation recompute of every transformer layer.
    recompute: bool = False
    # Layer implementation: "auto" (transformer-engine on GPUs, megatron's local modules on CPU),
    # "te" or "local".
    layer_spec: str = "auto"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Context parallelism needs transformer-engine attention: GPUs only.
    context_parallel: int = 1
    sequence_parallel: bool = False
    # Trainer ranks in total; data parallel size = world_size / (TP * PP * CP).
    world_size: int = 1
    # Megatron's distributed optimizer (ZeRO-1 sharding of optimizer state over DP).
    distributed_optimizer: bool = True
    # Minutes a collective may hang before the process group raises.
    timeout_minutes: int = 30


@dataclass
class OptimConfig:
    lr: float = 1e-6
    # Linear warm-up from 0 over this many optimizer steps, then constant.
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class BatchConfig:
    # Prompts per rollout batch, prompts per optimizer step, samples per prompt.
    rollout_prompts: int = 256
    mini_batch_prompts: int = 256
    group_size: int = 16
    # Token budget of one packed micro-batch per data-parallel rank (dynamic micro-batching).
    micro_batch_tokens: int = 16384
    # Prompt and response length limits (tokens).
    max_prompt_length: int = 2048
    max_response_length: int = 16384


@dataclass
class RunConfig:
    seed: int = 1234
    # Where the resolved config, checkpoints and logs go; empty means runs/<config name>.
    run_dir: str = ""


@dataclass
class SyncConfig:
    """Weight sync from the trainer to the rollout engines after every optimizer step."""

    # colocated: shared-memory / CUDA-IPC payloads through update_weights_from_tensor;
    # distributed: a gloo/NCCL group with the engines (update_weights_from_distributed);
    # disk: safetensors files + update_weights_from_disk.
    transport: str = "colocated"
    # Bucket memory of a sending rank (MiB; fractions for tests), used as two half-size
    # buckets: one in flight while the next is packed. A tensor larger than half goes alone.
    bucket_mb: float = 512.0
    # After each sync the trainer and every engine score a fixed probe batch; the step fails,
    # naming the engine, if their log-probabilities differ by more than verify_tolerance.
    verify: bool = True
    verify_tolerance: float = 1e-3
    verify_prompts: int = 4
    verify_new_tokens: int = 8
    # Bound on every wait of a sync (one engine call, the trainer's push, an engine restart).
    timeout_s: float = 300.0
    # How generation is paused during the update: abort | retract | in_place (SGLang's modes).
    pause_mode: str = "abort"
    # disk transport: where versions are written (empty: <run_dir>/weight_sync).
    disk_dir: str = ""
    # distributed transport: the address engines use to reach the sending trainer ranks.
    master_address: str = "127.0.0.1"


@dataclass
class OR1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    @property
    def data_parallel(self) -> int:
        p = self.parallel
        return p.world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)


# Valid values of enumerated string options, checked by config.validate.
DTYPES = ("fp32", "bf16")
LAYER_SPECS = ("auto", "te", "local")
SYNC_TRANSPORTS = ("colocated", "distributed", "disk")
SYNC_PAUSE_MODES = ("abort", "retract", "in_place")
