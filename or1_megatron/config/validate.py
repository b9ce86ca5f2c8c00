"""Cross-field checks of a run config against itself and the model's config.json.

Runs before any process starts, so a layout that cannot work fails in a second with a message
naming the key and the file, not in a collective twenty minutes into a cluster job.
"""
from __future__ import annotations

from or1_megatron.config.schema import (
    ALGO_MODES, DATA_ON_ERROR, DTYPES, IS_CORRECTIONS, LAYER_SPECS, MATH_BOXED, PLACEMENTS, RECOMPUTE_MODES,
    REWARD_COMPAT, ROLLOUT_BACKENDS,
    SYNC_PAUSE_MODES, SYNC_TRANSPORTS, OR1Config,
)
from or1_megatron.config.stages import Stage, resolve_stages
from or1_megatron.convert.hf_config import Qwen2Arch, arch_from_dict, layout_problems, load_arch
from or1_megatron.errors import ConfigError, ModelConfigError


def _check(ok: bool, source: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key}: {message}")


def validate(cfg: OR1Config, source: str) -> None:
    """Raise ConfigError naming `source` and the offending key if `cfg` cannot run."""
    m, p, o, b = cfg.model, cfg.parallel, cfg.optim, cfg.batch
    _check(m.dtype in DTYPES, source, "model.dtype", f"{m.dtype!r} is not one of {DTYPES}")
    _check(m.layer_spec in LAYER_SPECS, source, "model.layer_spec",
           f"{m.layer_spec!r} is not one of {LAYER_SPECS}")
    _check(m.recompute in RECOMPUTE_MODES, source, "model.recompute",
           f"{m.recompute!r} is not one of {RECOMPUTE_MODES}")
    for key, value in (("parallel.tensor_parallel", p.tensor_parallel),
                       ("parallel.pipeline_parallel", p.pipeline_parallel),
                       ("parallel.context_parallel", p.context_parallel),
                       ("parallel.world_size", p.world_size)):
        _check(value >= 1, source, key, f"must be >= 1, got {value}")
    model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    _check(p.world_size % model_parallel == 0, source, "parallel.world_size",
           f"{p.world_size} is not a multiple of tensor_parallel x pipeline_parallel x "
           f"context_parallel = {model_parallel}")
    _check(not p.sequence_parallel or p.tensor_parallel > 1, source, "parallel.sequence_parallel",
           "needs tensor_parallel > 1")
    _check(p.context_parallel == 1, source, "parallel.context_parallel",
           f"{p.context_parallel} is not supported yet: packed micro-batches are not split per "
           "context-parallel rank (and it needs transformer-engine attention); use 1")

    _check(m.make_vocab_size_divisible_by >= 1, source, "model.make_vocab_size_divisible_by",
           f"must be >= 1, got {m.make_vocab_size_divisible_by}")
    _check(o.lr > 0, source, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _check(o.clip_grad >= 0, source, "optim.clip_grad", "must be >= 0 (0 disables clipping)")

    _check(b.micro_batch_tokens >= 1 and b.max_prompt_length >= 1, source, "batch.micro_batch_tokens",
           "micro_batch_tokens and max_prompt_length must be >= 1")
    _check(cfg.run.max_steps >= 0, source, "run.max_steps", "must be >= 0")
    stages = resolve_stages(cfg)
    for stage in stages:
        _check_stage(cfg, stage, "batch" if not cfg.stages else stage.key_prefix, source)
    longest = b.max_prompt_length + max(stage.max_response_length for stage in stages)

    s = cfg.sync
    _check(s.transport in SYNC_TRANSPORTS, source, "sync.transport",
           f"{s.transport!r} is not one of {SYNC_TRANSPORTS}")
    _check(s.pause_mode in SYNC_PAUSE_MODES, source, "sync.pause_mode",
           f"{s.pause_mode!r} is not one of {SYNC_PAUSE_MODES}")
    _check(s.bucket_mb * (1 << 20) >= 1024, source, "sync.bucket_mb",
           f"must be at least 1 KiB (0.001), got {s.bucket_mb}")
    _check(s.verify_tolerance >= 0, source, "sync.verify_tolerance",
           f"must be >= 0 (0: by model.dtype), got {s.verify_tolerance}")
    _check(s.verify_mean_tolerance >= 0, source, "sync.verify_mean_tolerance",
           f"must be >= 0 (0: by model.dtype), got {s.verify_mean_tolerance}")
    _check(s.verify_prompts >= 1 and s.verify_new_tokens >= 1, source, "sync.verify_prompts",
           "verify_prompts and verify_new_tokens must be >= 1")
    _check(s.timeout_s > 0, source, "sync.timeout_s", f"must be > 0, got {s.timeout_s}")

    _validate_training(cfg, source)
    arch, hf = _architecture(cfg, source)
    for key, reason in layout_problems(arch, p.tensor_parallel, p.pipeline_parallel):
        _check(False, source, f"parallel.{key}", f"{reason} ({hf})")
    _check(longest <= arch.max_position_embeddings, source, "batch.max_response_length",
           f"max_prompt_length + max_response_length = {longest} exceeds "
           f"max_position_embeddings={arch.max_position_embeddings} ({hf})")


def _architecture(cfg: OR1Config, source: str) -> tuple[Qwen2Arch, str]:
    """The model's architecture and how to name it: from config.json, or the tiny model's spec."""
    if cfg.tiny_model.enabled:
        from or1_megatron.tiny_model import tiny_qwen2_dict

        t = cfg.tiny_model
        spec = tiny_qwen2_dict(vocab_size=t.tokenizer_vocab_size, hidden_size=t.hidden_size,
                               intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                               num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                               max_position_embeddings=t.max_position_embeddings)
        try:
            return arch_from_dict(spec, "tiny_model"), "tiny_model"
        except ModelConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        return load_arch(cfg.model.hf_path), f"model {cfg.model.hf_path}"
    except ModelConfigError as exc:
        raise ConfigError(f"{source}: model.hf_path: {exc}") from None


GPU_ENGINE_BACKENDS = ("sglang", "torch")


def gpu_layout_problems(cfg: OR1Config, backend: str) -> list[tuple[str, str]]:
    """(key, reason) for each thing colocated engines of `backend` cannot do on GPUs. Checked
    here when the config names a GPU backend, and again by `or1 train` once "auto" is resolved."""
    r, world = cfg.rollout, cfg.parallel.world_size
    if backend not in GPU_ENGINE_BACKENDS or r.placement != "colocated":
        return []
    problems = []
    if r.engines * r.engine_tp > world:
        problems.append(("rollout.engines", f"{r.engines} colocated engines x engine_tp "
                         f"{r.engine_tp} need more GPUs than the {world} policy ranks hold"))
    if cfg.sync.transport == "distributed":
        problems.append(("sync.transport", "distributed (NCCL) with colocated GPU engines would "
                         "put a policy rank and its engine on one GPU in one NCCL group; use "
                         "colocated (CUDA IPC) or rollout.placement=disaggregated"))
    return problems


def _validate_training(cfg: OR1Config, source: str) -> None:
    """The training loop's sections: algorithm, rollout, data, checkpoints, logging."""
    a, r, d = cfg.algo, cfg.rollout, cfg.data
    _check(0 <= a.clip_low < 1, source, "algo.clip_low", f"must be in [0, 1), got {a.clip_low}")
    _check(a.clip_high >= 0, source, "algo.clip_high", f"must be >= 0, got {a.clip_high}")
    _check(a.mode in ALGO_MODES, source, "algo.mode", f"{a.mode!r} is not one of {ALGO_MODES}")
    _check(a.mode != "one_step_off" or cfg.rollout.placement == "disaggregated", source, "algo.mode",
           "one_step_off overlaps rollout with training: it needs rollout.placement=disaggregated "
           "(colocated engines hand their memory to the trainer while it trains)")
    _check(a.is_correction in IS_CORRECTIONS, source, "algo.is_correction",
           f"{a.is_correction!r} is not one of {IS_CORRECTIONS}")
    _check(a.is_cap >= 1.0, source, "algo.is_cap", f"must be >= 1, got {a.is_cap}")
    _check(a.dual_clip == 0 or a.dual_clip > 1, source, "algo.dual_clip",
           f"must be 0 (off) or > 1, got {a.dual_clip}")
    e = a.entropy
    _check(e.delta >= 0, source, "algo.entropy.delta", f"must be >= 0, got {e.delta}")
    _check(0 <= e.coef_min <= e.coef_max, source, "algo.entropy.coef_max",
           f"need 0 <= coef_min ({e.coef_min}) <= coef_max ({e.coef_max})")
    _check(r.backend in ROLLOUT_BACKENDS, source, "rollout.backend",
           f"{r.backend!r} is not one of {ROLLOUT_BACKENDS}")
    _check(r.placement in PLACEMENTS, source, "rollout.placement",
           f"{r.placement!r} is not one of {PLACEMENTS}")
    rm = cfg.rewards.math
    _check(rm.boxed in MATH_BOXED, source, "rewards.math.boxed",
           f"{rm.boxed!r} is not one of {MATH_BOXED}")
    _check(rm.compat in REWARD_COMPAT, source, "rewards.math.compat",
           f"{rm.compat!r} is not one of {REWARD_COMPAT}")
    _check(r.engines >= 1, source, "rollout.engines", f"must be >= 1, got {r.engines}")
    _check(r.engine_tp >= 1, source, "rollout.engine_tp", f"must be >= 1, got {r.engine_tp}")
    _check(r.backend != "torch" or r.engine_tp == 1, source, "rollout.engine_tp",
           f"the torch engine runs on one GPU (engine_tp=1), got {r.engine_tp}; use "
           "rollout.backend=sglang for tensor-parallel engines")
    world = cfg.parallel.world_size
    colocated = r.placement == "colocated"
    _check(not colocated or world % r.engine_tp == 0, source, "rollout.engine_tp",
           f"colocated engines use the policy ranks' devices: engine_tp={r.engine_tp} must "
           f"divide parallel.world_size={world}")
    for key, reason in gpu_layout_problems(cfg, r.backend):
        _check(False, source, key, reason)
    _check(r.temperature > 0, source, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, source, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(0 < r.mem_fraction < 1, source, "rollout.mem_fraction",
           f"must be in (0, 1), got {r.mem_fraction}")
    _check(d.on_error in DATA_ON_ERROR, source, "data.on_error",
           f"{d.on_error!r} is not one of {DATA_ON_ERROR}")
    _check(d.eval_every >= 0 and d.eval_samples >= 1, source, "data.eval_every",
           "eval_every must be >= 0 and eval_samples >= 1")
    _check(d.eval_every == 0 or bool(d.eval_files) or d.arithmetic.enabled, source,
           "data.eval_files", f"data.eval_every={d.eval_every} but there is nothing to evaluate")
    _check(cfg.checkpoint.every_steps >= 0, source, "checkpoint.every_steps", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, source, "checkpoint.keep", "must be >= 1")
    _check(cfg.checkpoint.hf_every >= 0, source, "checkpoint.hf_every", "must be >= 0 (0: never)")
    _check(cfg.checkpoint.hf_keep >= 1, source, "checkpoint.hf_keep", "must be >= 1")
    _check(cfg.warmup.sft_steps >= 0, source, "warmup.sft_steps", "must be >= 0")
    _check(cfg.warmup.sft_steps == 0 or d.arithmetic.enabled, source, "warmup.sft_steps",
           "the supervised warm-up needs reference responses: only data.arithmetic has them")
    _check(not (d.train_files and d.arithmetic.enabled), source, "data.train_files",
           "give either data.train_files or data.arithmetic, not both")
    _check(cfg.logging.console_every >= 1, source, "logging.console_every", "must be >= 1")


def _check_stage(cfg: OR1Config, stage: Stage, prefix: str, source: str) -> None:
    """Batch sizes of one stage (or of `batch` when no stages are declared)."""
    b = cfg.batch
    for name in ("rollout_prompts", "mini_batch_prompts", "group_size", "max_response_length"):
        value = getattr(stage, name)
        _check(value >= 1, source, f"{prefix}.{name}", f"must be >= 1, got {value}")
    if cfg.stages:
        _check(stage.steps >= 1, source, f"{prefix}.steps", f"must be >= 1, got {stage.steps}")
    _check(stage.rollout_prompts % stage.mini_batch_prompts == 0, source,
           f"{prefix}.mini_batch_prompts",
           f"{stage.mini_batch_prompts} does not divide rollout_prompts={stage.rollout_prompts}")
    samples_per_step = stage.mini_batch_prompts * stage.group_size
    _check(samples_per_step % cfg.data_parallel == 0, source, f"{prefix}.mini_batch_prompts",
           f"mini_batch_prompts x group_size = {samples_per_step} samples per optimizer step do "
           f"not split evenly over data_parallel={cfg.data_parallel} ranks")
    longest = b.max_prompt_length + stage.max_response_length
    _check(b.micro_batch_tokens >= longest, source, "batch.micro_batch_tokens",
           f"{b.micro_batch_tokens} cannot hold one sequence of max_prompt_length + "
           f"max_response_length = {longest} tokens"
           + (f" ({stage.key})" if cfg.stages else ""))
