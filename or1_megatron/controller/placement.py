"""Where the policy ranks and the rollout engines go on a Ray cluster, and which GPUs each sees.

One placement group holds a bundle per policy rank (one CPU, one GPU on GPU runs) and, when
disaggregated, a bundle per engine (its TP GPUs). The GPU rules this module owns:
- Colocated, a policy rank and an engine share a bundle's one GPU: the rank asks for
  `RANK_SHARE` of it and the engine host for `ENGINE_SHARE`, so both fit (a rank asking for a
  whole GPU never fits beside the engine).
- Ray restricts each actor's CUDA_VISIBLE_DEVICES to its own GPUs, so an engine with TP > 1
  colocated over several bundles would see one. Its host asks each of its bundles which GPU it
  holds (a short task per bundle) and starts the engine with exactly those GPUs visible and
  `--base-gpu-id 0`: a GPU id is an index into the engine's own visible list, never a physical
  id.
Policy ranks see their one GPU as device 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from or1_megatron.config.schema import OR1Config
from or1_megatron.config.validate import GPU_ENGINE_BACKENDS

RANK_SHARE = 0.8     # of a bundle's GPU, for a colocated policy rank
ENGINE_SHARE = 0.1   # for the colocated engine host in its first bundle
PROBE_SHARE = 0.05   # for the task that reads a bundle's GPU id (released when it returns)
GPU_BACKENDS = GPU_ENGINE_BACKENDS  # engines that run on GPUs


@dataclass(frozen=True)
class EngineSlot:
    """Engine `index`: the bundles holding its GPUs (first: where its host actor sits)."""

    index: int
    bundles: tuple[int, ...]
    host_gpus: float  # num_gpus of the host actor


@dataclass(frozen=True)
class Placement:
    world: int                 # policy ranks: bundles 0 .. world - 1
    bundles: list[dict[str, float]]
    rank_gpus: float           # num_gpus of each policy rank actor
    engines: list[EngineSlot]
    gpu_engines: bool          # engines run on GPUs (their hosts pin CUDA_VISIBLE_DEVICES)


def plan_placement(config: OR1Config, backend: str, gpus: bool) -> Placement:
    """The bundles and GPU requests of a run whose engines use `backend`, on GPUs or not."""
    r, world = config.rollout, config.parallel.world_size
    colocated = r.placement == "colocated"
    gpu_engines = gpus and backend in GPU_BACKENDS
    policy = [{"CPU": 1.0, **({"GPU": 1.0} if gpus else {})} for _ in range(world)]
    engines, extra = [], []
    for i in range(r.engines):
        if colocated:
            first = (i * r.engine_tp) % world
            bundles = tuple(first + k for k in range(r.engine_tp)) if gpu_engines else (first,)
            engines.append(EngineSlot(i, bundles, ENGINE_SHARE if gpu_engines else 0.0))
        else:
            extra.append({"CPU": 1.0, **({"GPU": float(r.engine_tp)} if gpu_engines else {})})
            engines.append(EngineSlot(i, (world + i,), float(r.engine_tp) if gpu_engines else 0.0))
    rank_gpus = (RANK_SHARE if colocated and gpu_engines else 1.0) if gpus else 0.0
    return Placement(world=world, bundles=[*policy, *extra], rank_gpus=rank_gpus,
                     engines=engines, gpu_engines=gpu_engines)


def bundle_gpu_ids(placement_group: Any, bundles: tuple[int, ...], timeout_s: float = 120.0
                   ) -> list[str]:
    """The GPU id Ray gave each of `bundles` (one short task in each), as Ray names them in
    CUDA_VISIBLE_DEVICES."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=PROBE_SHARE)
    def gpu_id() -> str:
        ids = ray.get_gpu_ids()
        if len(ids) != 1:
            raise RuntimeError(f"a bundle's probe sees GPUs {ids}, expected one")
        return str(ids[0])

    refs = [gpu_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group, placement_group_bundle_index=b)).remote() for b in bundles]
    return list(ray.get(refs, timeout=timeout_s))
