"""Cross-field checks of a run config against itself and the model's config.json.

Runs before any process starts, so a layout that cannot work fails in a second with a message
naming the key and the file, not in a collective twenty minutes into a cluster job.
"""
from __future__ import annotations

from or1_megatron.config.schema import DTYPES, LAYER_SPECS, SYNC_PAUSE_MODES, SYNC_TRANSPORTS, OR1Config
from or1_megatron.convert.hf_config import layout_problems, load_arch
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
    _check(p.context_parallel == 1 or m.layer_spec != "local", source, "parallel.context_parallel",
           "context parallelism needs transformer-engine attention (model.layer_spec te/auto on GPUs)")

    _check(m.make_vocab_size_divisible_by >= 1, source, "model.make_vocab_size_divisible_by",
           f"must be >= 1, got {m.make_vocab_size_divisible_by}")
    _check(o.lr > 0, source, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _check(o.clip_grad >= 0, source, "optim.clip_grad", "must be >= 0 (0 disables clipping)")

    for key, value in (("batch.rollout_prompts", b.rollout_prompts),
                       ("batch.mini_batch_prompts", b.mini_batch_prompts),
                       ("batch.group_size", b.group_size),
                       ("batch.micro_batch_tokens", b.micro_batch_tokens),
                       ("batch.max_prompt_length", b.max_prompt_length),
                       ("batch.max_response_length", b.max_response_length)):
        _check(value >= 1, source, key, f"must be >= 1, got {value}")
    _check(b.rollout_prompts % b.mini_batch_prompts == 0, source, "batch.mini_batch_prompts",
           f"{b.mini_batch_prompts} does not divide batch.rollout_prompts={b.rollout_prompts}")
    samples_per_step = b.mini_batch_prompts * b.group_size
    _check(samples_per_step % cfg.data_parallel == 0, source, "batch.mini_batch_prompts",
           f"mini_batch_prompts x group_size = {samples_per_step} samples per optimizer step do "
           f"not split evenly over data_parallel={cfg.data_parallel} ranks")
    longest = b.max_prompt_length + b.max_response_length
    _check(b.micro_batch_tokens >= longest, source, "batch.micro_batch_tokens",
           f"{b.micro_batch_tokens} cannot hold one sequence of max_prompt_length + "
           f"max_response_length = {longest} tokens")

    s = cfg.sync
    _check(s.transport in SYNC_TRANSPORTS, source, "sync.transport",
           f"{s.transport!r} is not one of {SYNC_TRANSPORTS}")
    _check(s.pause_mode in SYNC_PAUSE_MODES, source, "sync.pause_mode",
           f"{s.pause_mode!r} is not one of {SYNC_PAUSE_MODES}")
    _check(s.bucket_mb * (1 << 20) >= 1024, source, "sync.bucket_mb",
           f"must be at least 1 KiB (0.001), got {s.bucket_mb}")
    _check(s.verify_tolerance > 0, source, "sync.verify_tolerance",
           f"must be > 0, got {s.verify_tolerance}")
    _check(s.verify_prompts >= 1 and s.verify_new_tokens >= 1, source, "sync.verify_prompts",
           "verify_prompts and verify_new_tokens must be >= 1")
    _check(s.timeout_s > 0, source, "sync.timeout_s", f"must be > 0, got {s.timeout_s}")

    try:
        arch = load_arch(m.hf_path)
    except ModelConfigError as exc:
        raise ConfigError(f"{source}: model.hf_path: {exc}") from None
    hf = f"model {m.hf_path}"
    for key, reason in layout_problems(arch, p.tensor_parallel, p.pipeline_parallel):
        _check(False, source, f"parallel.{key}", f"{reason} ({hf})")
    _check(longest <= arch.max_position_embeddings, source, "batch.max_response_length",
           f"max_prompt_length + max_response_length = {longest} exceeds "
           f"max_position_embeddings={arch.max_position_embeddings} ({hf})")
