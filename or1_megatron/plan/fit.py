"""Does a layout fit its GPUs, stage by stage, and if not, which nearby layout does?

A stage fits when both phases of a step fit one GPU:
  training  policy weights + gradients + optimizer shard + activations + logits + overhead;
  rollout   (colocated) the policy state, which stays resident, + SGLang's mem_fraction of the
            GPU (weights + KV cache) + overhead; SGLang releases its share while the policy
            trains (release_memory_occupation), so the two peaks never coincide;
and one engine's KV cache holds at least one sequence of the stage's maximum length. The search
for a layout that fits changes as little as it can: recompute, a tighter micro-batch, larger
TP or PP, a smaller engine memory fraction, and only then more nodes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from functools import lru_cache

from or1_megatron.config.schema import RECOMPUTE_MODES
from or1_megatron.config.stages import Stage
from or1_megatron.convert.hf_config import Qwen2Arch, layout_problems
from or1_megatron.plan.engine_memory import EngineMemory, engine_memory
from or1_megatron.plan.hardware import GPU, Efficiency
from or1_megatron.plan.layout import Layout
from or1_megatron.plan.memory import GIB, PolicyMemory, policy_memory, stage_params_per_rank
from or1_megatron.plan.step_time import StepTime, Workload, step_time


@lru_cache(maxsize=None)
def _params_per_rank(arch: Qwen2Arch, tp: int, pp: int, padded_vocab: int) -> int:
    return max(stage_params_per_rank(arch, tp, pp, padded_vocab))


def total_params(arch: Qwen2Arch, padded_vocab: int) -> int:
    return _params_per_rank(arch, 1, 1, padded_vocab)


def policy_for(arch: Qwen2Arch, layout: Layout, recompute: str) -> PolicyMemory:
    """One policy rank's memory; context parallelism splits each micro-batch's tokens."""
    return policy_memory(
        arch, tp=layout.tensor_parallel, pp=layout.pipeline_parallel,
        # the distributed optimizer shards over data x context parallel ranks
        dp=layout.data_parallel * layout.context_parallel,
        micro_batch_tokens=layout.micro_batch_tokens // layout.context_parallel,
        padded_vocab=layout.padded_vocab(arch.vocab_size), recompute=recompute,
        sequence_parallel=layout.sequence_parallel,
        distributed_optimizer=layout.distributed_optimizer,
    )


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    longest_sequence: int
    policy: PolicyMemory          # at the layout's recompute mode
    activations_by_mode: dict[str, int]  # every recompute mode's activations, for comparison
    engine: EngineMemory
    train_peak: int
    rollout_peak: int
    time: StepTime | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    layout: Layout
    gpu: GPU
    nodes: int
    stages: tuple[StagePlan, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.problems and all(not s.problems for s in self.stages)

    @property
    def peak(self) -> int:
        return max(max(s.train_peak, s.rollout_peak) for s in self.stages)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _layout_problems(arch: Qwen2Arch, layout: Layout, gpu: GPU, nodes: int,
                     stages: list[Stage]) -> list[str]:
    problems = [f"parallel.{key}: {reason}"
                for key, reason in layout_problems(arch, layout.tensor_parallel, layout.pipeline_parallel)]
    available = nodes * gpu.gpus_per_node
    if layout.world_size % layout.model_parallel:
        problems.append(f"parallel.world_size={layout.world_size} is not a multiple of TP x PP x CP = "
                        f"{layout.model_parallel}")
    if layout.gpus_needed() > available:
        what = ("the larger of trainer ranks and engine GPUs" if layout.placement == "colocated"
                else "trainer ranks + engine GPUs")
        problems.append(f"the layout needs {layout.gpus_needed()} GPUs ({what}), {nodes} node(s) of "
                        f"{gpu.gpus_per_node} have {available}")
    if layout.tensor_parallel > gpu.gpus_per_node or layout.engine_tp > gpu.gpus_per_node:
        problems.append(f"tensor parallelism beyond one node ({gpu.gpus_per_node} GPUs) runs its "
                        "per-layer collectives over the network")
    for stage in stages:
        samples = stage.mini_batch_prompts * stage.group_size
        if layout.data_parallel and samples % layout.data_parallel:
            problems.append(f"{stage.key}: {samples} samples per optimizer step do not split over "
                            f"data_parallel={layout.data_parallel}")
    return problems


def _stage_problems(plan: StagePlan, layout: Layout, gpu: GPU, eff: Efficiency) -> list[str]:
    problems, policy, capacity = [], plan.policy, gpu.memory_bytes
    if plan.train_peak > capacity:
        act = f"activations {_gib(policy.activations)} for {layout.micro_batch_tokens:,}-token micro-batches"
        act += f" with recompute {layout.recompute}"
        problems.append(f"training needs {_gib(plan.train_peak)} of {_gib(capacity)}: policy state "
                        f"{_gib(policy.weights + policy.grads + policy.optimizer)}, {act}, logits "
                        f"{_gib(policy.logits)}, overhead {eff.overhead_gib:.1f} GiB")
    if layout.placement == "colocated" and plan.rollout_peak > capacity:
        problems.append(f"rollout needs {_gib(plan.rollout_peak)} of {_gib(capacity)}: the resident "
                        f"policy state {_gib(policy.weights + policy.grads + policy.optimizer)} plus "
                        f"SGLang's mem_fraction {layout.mem_fraction} = {_gib(plan.engine.static)}")
    if plan.engine.kv_cache <= 0:
        problems.append(f"an engine's weights ({_gib(plan.engine.weights)} per GPU at engine_tp="
                        f"{layout.engine_tp}) exceed mem_fraction {layout.mem_fraction} of the GPU")
    elif plan.engine.kv_tokens < plan.longest_sequence:
        problems.append(f"an engine's KV cache holds {plan.engine.kv_tokens:,} tokens, less than one "
                        f"{plan.longest_sequence:,}-token sequence")
    return problems


def evaluate(arch: Qwen2Arch, layout: Layout, stages: list[Stage], gpu: GPU, nodes: int,
             eff: Efficiency, workload: Workload, with_time: bool = True) -> Plan:
    problems = _layout_problems(arch, layout, gpu, nodes, stages)
    if any(p.startswith("parallel.") for p in problems):
        return Plan(layout, gpu, nodes, (), tuple(problems))  # the shapes cannot be split at all
    padded = layout.padded_vocab(arch.vocab_size)
    total = total_params(arch, padded)
    policy = policy_for(arch, layout, layout.recompute)
    by_mode = {mode: policy_for(arch, layout, mode).activations for mode in RECOMPUTE_MODES}
    engine = engine_memory(arch, total, engine_tp=layout.engine_tp, mem_fraction=layout.mem_fraction,
                           gpu_memory=gpu.memory_bytes)
    overhead = int(eff.overhead_gib * GIB)
    state = policy.weights + policy.grads + policy.optimizer
    plans = []
    for stage in stages:
        draft = StagePlan(
            stage=stage, longest_sequence=layout.max_prompt_length + stage.max_response_length,
            policy=policy, activations_by_mode=by_mode, engine=engine,
            train_peak=policy.total + overhead,
            rollout_peak=state + engine.static + overhead if layout.placement == "colocated" else 0,
            time=(step_time(arch, layout, stage, gpu, eff, workload, engine, total, policy.params)
                  if with_time else None),
            problems=(),
        )
        plans.append(replace(draft, problems=tuple(_stage_problems(draft, layout, gpu, eff))))
    return Plan(layout, gpu, nodes, tuple(plans), tuple(problems))


def _candidates(arch: Qwen2Arch, layout: Layout, gpu: GPU, nodes: int, stages: list[Stage]):
    """(extra nodes, knobs changed, TP x PP, layout): cheapest first once sorted."""
    longest = layout.max_prompt_length + max(s.max_response_length for s in stages)
    tps = [t for t in (1, 2, 4, 8) if layout.tensor_parallel <= t <= gpu.gpus_per_node]
    pps = [p for p in range(layout.pipeline_parallel, 9) if arch.num_layers % p == 0]
    # the layout's own recompute mode, and the ones that save more memory
    recomputes = list(RECOMPUTE_MODES[RECOMPUTE_MODES.index(layout.recompute):])
    tokens = sorted({layout.micro_batch_tokens, min(layout.micro_batch_tokens, longest)})
    fractions = [layout.mem_fraction] + [f for f in (0.7, 0.6, 0.5, 0.4, 0.3) if f < layout.mem_fraction]
    if layout.placement != "colocated":
        fractions = [layout.mem_fraction]
    out = []
    for scale in (1, 2, 4):
        world = layout.world_size * scale
        engines = layout.engines * scale
        for tp, pp, rc, mbt, mf in itertools.product(tps, pps, recomputes, tokens, fractions):
            cand = replace(layout, tensor_parallel=tp, pipeline_parallel=pp, recompute=rc,
                           micro_batch_tokens=mbt, mem_fraction=mf, world_size=world, engines=engines,
                           # sequence parallelism splits activations by TP at no cost: on with TP
                           sequence_parallel=tp > 1)
            if cand == layout:
                continue
            changed = len(cand.overrides(layout))
            out.append(((nodes * scale - nodes, changed, tp * pp, -mf), nodes * scale, cand))
    out.sort(key=lambda item: item[0])
    return out


def suggest(arch: Qwen2Arch, layout: Layout, stages: list[Stage], gpu: GPU, nodes: int,
            eff: Efficiency, workload: Workload) -> Plan | None:
    """The least-changed layout that fits every stage (up to 4x the nodes), or None."""
    for _, cand_nodes, cand in _candidates(arch, layout, gpu, nodes, stages):
        plan = evaluate(arch, cand, stages, gpu, cand_nodes, eff, workload, with_time=False)
        if plan.fits:
            return evaluate(arch, cand, stages, gpu, cand_nodes, eff, workload)
    return None
