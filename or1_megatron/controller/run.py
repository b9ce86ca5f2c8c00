"""Starts a training run: Ray, the placement group, policy ranks, engines, reward pool, loop.

`train(config, run_dir, resume)` is what `or1 train` runs once the config is loaded: it joins or
starts Ray, reserves one bundle per policy rank (plus the engines' own when disaggregated),
builds the policy ranks and the engines in those bundles, restores the newest checkpoint when
resuming, runs the `Trainer`, and tears everything down (also on errors and SIGTERM).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from or1_megatron.config.loader import save_resolved_config
from or1_megatron.config.schema import OR1Config
from or1_megatron.config.stages import total_steps
from or1_megatron.config.validate import gpu_layout_problems
from or1_megatron.controller import ranks
from or1_megatron.controller.checkpoints import CheckpointDirs
from or1_megatron.controller.hf_exports import HfExports
from or1_megatron.controller.data import base_model_path, load_training_data
from or1_megatron.controller.engines import resolved_backend, start_engines
from or1_megatron.controller.loop import StopFlag, Trainer
from or1_megatron.controller.metrics import MetricsWriter
from or1_megatron.controller.placement import GPU_BACKENDS, Placement, plan_placement
from or1_megatron.convert.hf_config import load_arch
from or1_megatron.errors import OR1Error

log = logging.getLogger(__name__)


class ResumeError(OR1Error):
    """The run directory does not fit the resume mode asked for."""


def _start_ray(config: OR1Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
        return
    rollout = config.rollout
    needed = config.parallel.world_size + (rollout.engines if rollout.placement != "colocated" else 0)
    # Logical CPUs: one per policy rank and disaggregated engine, even on a 2-core machine.
    cpus = config.ray.num_cpus or max(os.cpu_count() or 1, needed)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)


def _placement_group(config: OR1Config, placement: Placement) -> Any:
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group(placement.bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=config.rollout.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise OR1Error(f"Ray could not place {placement.world} policy ranks and "
                       f"{len(placement.bundles) - placement.world} engine bundles "
                       f"({placement.bundles}) within {config.rollout.start_timeout_s:.0f} s; "
                       f"cluster resources: {ray.cluster_resources()}") from None
    return group


def run_placement(config: OR1Config) -> Placement:
    """This run's placement on this machine's devices; refuses what cannot run on GPUs."""
    backend = resolved_backend(config)
    if backend in GPU_BACKENDS and not _has_gpu():
        raise OR1Error(f"rollout.backend={backend} runs engines on GPUs and this machine has "
                       "none; use rollout.backend=cpu")
    placement = plan_placement(config, backend, gpus=_has_gpu())
    problems = gpu_layout_problems(config, backend)  # the config's checks, "auto" resolved
    if problems:
        raise OR1Error("; ".join(f"{key}: {reason}" for key, reason in problems))
    world, r = config.parallel.world_size, config.rollout
    if placement.gpu_engines and r.placement == "colocated" and world > 1:
        # Each engine TP rank must get CUDA IPC handles from the policy rank on its own GPU
        # (a handle of another GPU cannot be opened where only one GPU is visible); the sender
        # packs on one rank per stage today.
        raise OR1Error(f"colocated GPU engines with {world} policy ranks are not built yet: "
                       "CUDA IPC handles come from one rank per pipeline stage, which only the "
                       "engine on that rank's GPU can open; use parallel.world_size=1, or "
                       "rollout.placement=disaggregated with sync.transport=distributed (NCCL)")
    return placement


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    latest = CheckpointDirs(run_dir).latest()
    if resume == "never" and latest is not None:
        raise ResumeError(f"{run_dir} already holds checkpoints (newest: {latest[1]}); "
                          "use --resume auto to continue it, or another --run-dir")
    return latest[1] if latest and resume == "auto" else None


async def train(config: OR1Config, run_dir: Path, resume: str, stop: StopFlag) -> None:
    import ray

    from or1_megatron.controller.ray_group import RayRankGroup
    from or1_megatron.eval.sampling import SamplingSession
    from or1_megatron.rewards.config import RewardConfig
    from or1_megatron.sync.coordinator import WeightSyncCoordinator

    resume_from = checkpoint_to_resume(run_dir, resume)
    hf_path = base_model_path(config, run_dir)
    config.model.hf_path = hf_path
    save_resolved_config(config, run_dir)
    placement = run_placement(config)
    _start_ray(config)
    stop.install()
    group = _placement_group(config, placement)
    policy = engines = session = coordinator = metrics = None
    try:
        engines = start_engines(config, hf_path, group, placement, str(run_dir / "engine_logs"))
        log.info("starting %d policy ranks", config.parallel.world_size)
        policy = RayRankGroup(config.parallel.world_size, ranks.setup_policy_rank, config,
                              placement_group=group, gpus_per_rank=placement.rank_gpus,
                              timeout_s=max(config.sync.timeout_s, 600.0))
        session = SamplingSession(hf_path, engines,
                                  reward_config=RewardConfig.from_run_config(config.rewards),
                                  request_timeout_s=config.sync.timeout_s,
                                  resync=lambda client: trainer.refeed_engine(client))
        for index, engine in enumerate(engines):
            log.info("engine %d at %s", index, engine.url)
        coordinator = WeightSyncCoordinator(engines, config.sync,
                                            vocab_size=load_arch(hf_path).vocab_size,
                                            hf_config_dir=hf_path, run_dir=str(run_dir),
                                            engine_tp_size=config.rollout.engine_tp,
                                            dtype=config.model.dtype)
        resumed_step, saved = 0, None
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
            saved = policy.call(ranks.load_checkpoint, str(resume_from))[0]["trainer"]
            resumed_step = int(saved["step"])
        metrics = MetricsWriter(run_dir, tensorboard=config.logging.tensorboard,
                                resume_after_step=resumed_step if saved else -1,
                                console_every=config.logging.console_every)
        await session.__aenter__()
        coordinator.router = session.router  # no engine restart by the router during a sync
        data = load_training_data(config, session.tokenizer)
        trainer = Trainer(config, ranks_group=policy, session=session, coordinator=coordinator,
                          metrics=metrics, checkpoints=CheckpointDirs(run_dir),
                          train_records=data.train, heldout_records=data.heldout,
                          reference_response=data.reference_response, stop=stop,
                          hf_exports=HfExports(run_dir, config) if config.checkpoint.hf_every else None)
        if saved is not None:
            trainer.restore(saved)
        log.info("training %d steps (from step %d) in %s", total_steps(config), resumed_step, run_dir)
        await trainer.run()
    finally:
        if metrics is not None:
            metrics.close()
        if coordinator is not None:
            await coordinator.close()
        if session is not None:
            await session.close()  # kills nothing it did not start: engines are ours below
        for engine in engines or []:
            engine.kill()
        if policy is not None:
            policy.close()
        ray.util.remove_placement_group(group)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
