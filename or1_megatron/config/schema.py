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
    # Activation recompute: "none"; "selective" (each layer's norms and MLP are recomputed in
    # backward, its attention inputs/outputs kept: at Qwen2.5 shapes about a fifth of the
    # activations for about a fifth more compute); "full" (only each layer's input is kept;
    # the whole layer is recomputed: a third more compute).
    recompute: str = "none"
    # Layer implementation: "auto" (transformer-engine on GPUs, megatron's local modules on CPU),
    # "te" or "local".
    layer_spec: str = "auto"

    def __post_init__(self) -> None:
        # recompute was a switch until 2026-12: configs saved then (true/false) still load.
        self.recompute = _LEGACY_RECOMPUTE.get(str(self.recompute), self.recompute)


_LEGACY_RECOMPUTE = {"True": "full", "true": "full", "False": "none", "false": "none"}


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
    # Stop after this many steps in total (0: when the last stage ends).
    max_steps: int = 0


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
    # naming the engine, if their log-probabilities differ on one token by more than
    # verify_tolerance, or on average by more than verify_mean_tolerance. 0: the rule for
    # model.dtype (fp32: 1e-3 / 1e-4; bf16: 0.5 / 5e-2, since bf16 kernels differ by up to
    # ~1e-1 on single tokens; sync/verify.py).
    verify: bool = True
    verify_tolerance: float = 0.0
    verify_mean_tolerance: float = 0.0
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
    # On CPU: move the trainer's parameters into /dev/shm once, so colocated engines read them
    # in place at TP1 (no bucket copy) and a stage's TP rank 0 reads its TP peers' shards there
    # instead of receiving them over gloo (each about 2x faster); needs /dev/shm room for the
    # model (a container's default 64 MB is not). False copies everything into buckets and
    # sends TP shards point to point.
    share_parameters: bool = True


@dataclass
class StageConfig:
    """One stage of MAGIC's multi-stage schedule. A 0 (or "") means: as in `batch`."""

    # Rollout batches in the stage, as the paper counts steps (OR1-7B stage 1: steps 0-660);
    # each runs rollout_prompts / mini_batch_prompts optimizer steps (N_SGD).
    steps: int = MISSING
    name: str = ""
    max_response_length: int = 0
    rollout_prompts: int = 0
    mini_batch_prompts: int = 0
    group_size: int = 0


@dataclass
class EntropyControlConfig:
    """Adaptive entropy control (paper defaults; the released scripts use delta 1e-4, coef_max 5e-3)."""

    enabled: bool = True
    target: float = 0.2
    delta: float = 0.005
    coef_init: float = 0.0
    coef_min: float = 0.0
    coef_max: float = 1.0


@dataclass
class AlgoConfig:
    # PPO clip range below / above 1 (clip-higher when clip_high > clip_low); dual clip off at 0.
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0
    advantage_eps: float = 1e-6
    # Rejection sampling: drop groups whose rewards are all equal (zero advantage everywhere).
    drop_uniform_groups: bool = True
    # Between stages, drop prompts the policy solved in every sample of the previous stage.
    online_filter: bool = True
    entropy: EntropyControlConfig = field(default_factory=EntropyControlConfig)
    # sync: rollout, then train, then sync (the paper). one_step_off: the engines generate the
    # next batch (with the weights of the step before) while the trainer trains on this one;
    # needs rollout.placement=disaggregated.
    mode: str = "sync"
    # Importance-sampling correction of the engine/trainer mismatch (algo/importance.py):
    # none (the paper), tis (weight min(pi_old / pi_engine, is_cap)) or mis (drop tokens whose
    # ratio exceeds is_cap). The engines then return their sampling log-probs.
    is_correction: str = "none"
    is_cap: float = 2.0


@dataclass
class RolloutConfig:
    # cpu: `or1 serve` engines (transformers) on the CPU; torch: `or1 serve --device cuda` (the
    # same engine on a GPU, for machines without SGLang); sglang: `python -m
    # sglang.launch_server`; auto: sglang when a GPU is present, else cpu.
    backend: str = "auto"
    engines: int = 1
    engine_tp: int = 1
    # colocated: policy ranks and engines share devices and swap memory (release/resume);
    # disaggregated: engines get devices of their own.
    placement: str = "colocated"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # SGLang's --mem-fraction-static; ignored by the CPU engine.
    mem_fraction: float = 0.5
    # Torch threads per CPU engine.
    engine_threads: int = 1
    start_timeout_s: float = 300.0
    # Passed verbatim to the engine command line (e.g. ["--attention-backend", "fa3"]).
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ArithmeticTaskConfig:
    """The CPU demo's synthetic task: integer arithmetic answered as `<think>...</think> \\boxed{n}`."""

    enabled: bool = False
    train_problems: int = 2000
    heldout_problems: int = 64
    max_operand: int = 99
    seed: int = 0


@dataclass
class DataConfig:
    # Training problems: verl parquet, JSON/JSONL, LeetCodeDataset or LiveCodeBench files.
    train_files: list[str] = field(default_factory=list)
    format: str = "auto"
    # raise: a malformed row stops the run naming file and row; skip: counted and logged.
    on_error: str = "raise"
    # Offline filter: drop prompts the base model solved 0/N or N/N, from the files'
    # model_difficulty for this model name, or from a pass-rate file of tools/estimate_difficulty.py.
    offline_filter_model: str = ""
    offline_filter_pass_rates: str = ""
    # Held-out problems scored every `eval_every` steps (0: never) with `eval_samples` each.
    eval_files: list[str] = field(default_factory=list)
    eval_every: int = 0
    eval_samples: int = 1
    eval_max_problems: int = 0
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class TinyModelConfig:
    """Build the base model from scratch into <run_dir>/base_model (the CPU demo); off by default."""

    enabled: bool = False
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    tokenizer_vocab_size: int = 512


@dataclass
class WarmupConfig:
    """Supervised warm-up of the policy on reference responses before RL (the CPU demo)."""

    sft_steps: int = 0
    sft_lr: float = 1e-3
    sft_batch: int = 64


@dataclass
class CheckpointConfig:
    # Save every N steps (0: only at the end and on SIGTERM); keep the newest `keep`.
    every_steps: int = 50
    keep: int = 2
    # Also write a Hugging Face checkpoint (<run_dir>/hf/step_N: safetensors, config, tokenizer)
    # every N steps and at the end (0: never), for `or1 eval`, `or1 serve` or a release; keep
    # the newest `hf_keep`. Its tensors equal `or1 convert mcore-to-hf` of that step's checkpoint.
    hf_every: int = 0
    hf_keep: int = 2


@dataclass
class RayConfig:
    # Empty: start a local Ray instance; otherwise the address of a running cluster ("auto" too).
    address: str = ""
    # CPUs the local instance may use (0: all of the machine's).
    num_cpus: int = 0


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    # A console progress line every N steps.
    console_every: int = 1


@dataclass
class MathRewardSection:
    # last: grade the last \boxed{} of the final answer; all: math-verify sees (and merges)
    # every box, as the released scorer does.
    boxed: str = "last"
    # or1: the paper's rules (truncated responses score 0, text after the first </think>,
    # ability from the row); released: Skywork-OR1's released scorer (rewards/released.py).
    compat: str = "or1"


@dataclass
class RewardsConfig:
    math: MathRewardSection = field(default_factory=MathRewardSection)
    # The paper's rule: a response cut at the length limit (or never closing </think>) scores 0.
    truncated_scores_zero: bool = True


@dataclass
class OR1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    # MAGIC's stages, run in order; an empty list is one stage of `batch` for run.max_steps.
    stages: list[StageConfig] = field(default_factory=list)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)

    @property
    def data_parallel(self) -> int:
        p = self.parallel
        return p.world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)


# Valid values of enumerated string options, checked by config.validate.
DTYPES = ("fp32", "bf16")
LAYER_SPECS = ("auto", "te", "local")
RECOMPUTE_MODES = ("none", "selective", "full")  # least memory saved first
SYNC_TRANSPORTS = ("colocated", "distributed", "disk")
SYNC_PAUSE_MODES = ("abort", "retract", "in_place")
ROLLOUT_BACKENDS = ("auto", "cpu", "torch", "sglang")
PLACEMENTS = ("colocated", "disaggregated")
MATH_BOXED = ("last", "all")
REWARD_COMPAT = ("or1", "released")
DATA_ON_ERROR = ("raise", "skip")
ALGO_MODES = ("sync", "one_step_off")
IS_CORRECTIONS = ("none", "tis", "mis")
