"""The planner's printed report: assumptions, memory per GPU, step-time breakdown, verdict."""
from __future__ import annotations

from or1_megatron.plan.fit import Plan, StagePlan
from or1_megatron.plan.hardware import Efficiency
from or1_megatron.plan.layout import Layout
from or1_megatron.plan.memory import GIB
from or1_megatron.plan.step_time import Workload


def _g(n: float) -> str:
    return f"{n / GIB:6.1f}"


def _seconds(s: float) -> str:
    return f"{s:8.2f} s"


def describe_layout(layout: Layout) -> str:
    return (f"TP{layout.tensor_parallel} x PP{layout.pipeline_parallel} x CP{layout.context_parallel} x "
            f"DP{layout.data_parallel} = {layout.world_size} trainer ranks"
            f" ({'sequence parallel, ' if layout.sequence_parallel else ''}"
            f"{'distributed optimizer, ' if layout.distributed_optimizer else ''}"
            f"recompute {layout.recompute}, {layout.micro_batch_tokens:,}-token "
            f"micro-batches); {layout.engines} SGLang engines x TP{layout.engine_tp}, "
            f"{layout.placement}, mem_fraction {layout.mem_fraction}; sync {layout.transport}")


def _stage_lines(sp: StagePlan, layout: Layout) -> list[str]:
    st, p, e = sp.stage, sp.policy, sp.engine
    lines = [
        f"{st.key}: steps {st.first_step}-{st.end_step}, {st.rollout_prompts} prompts x "
        f"{st.group_size} samples, {st.mini_batch_prompts} per optimizer step (N_SGD {st.sgd_steps}), "
        f"longest sequence {sp.longest_sequence:,} tokens",
        "  memory per GPU (GiB)",
        f"    policy weights (bf16)          {_g(p.weights)}   ({p.params:,} parameters on the fullest rank)",
        f"    gradients (fp32)               {_g(p.grads)}",
        f"    optimizer states               {_g(p.optimizer)}   (fp32 master + Adam moments"
        f"{', sharded over DP' if layout.distributed_optimizer else ''})",
        *(f"    activations, recompute {mode:9s} {_g(act)}{'   (this layout)' if mode == layout.recompute else ''}"
          for mode, act in sp.activations_by_mode.items()),
        f"    logits / loss (fused kernel)   {_g(p.logits)}",
        f"    training peak (+ overhead)     {_g(sp.train_peak)}",
        f"    SGLang weights                 {_g(e.weights)}",
        f"    SGLang KV cache                {_g(max(e.kv_cache, 0))}   ({e.kv_tokens:,} tokens at "
        f"{e.kv_bytes_per_token:,} B/token)",
    ]
    if layout.placement == "colocated":
        lines.append(f"    rollout peak (colocated)       {_g(sp.rollout_peak)}   (policy state resident "
                     f"+ mem_fraction x GPU + overhead)")
    if sp.time is not None:
        t = sp.time
        lines += [
            "  step time (estimate)",
            f"    rollout    {_seconds(t.rollout)}   ({t.decode_concurrency} sequences per engine at "
            f"once, {t.decode_steps:,} decode steps)",
            f"    logprob    {_seconds(t.logprob)}",
            f"    train      {_seconds(t.train)}",
            f"    sync       {_seconds(t.sync)}",
            f"    total      {_seconds(t.total)}   ({t.tokens:,.0f} tokens, {t.tokens_per_second:,.0f} tokens/s; "
            f"{t.total * st.steps / 3600:,.1f} h for the stage's {st.steps} steps)",
            f"    one_step_off {_seconds(t.one_step_off_total)} (max(rollout, logprob + train) + sync at "
            f"these phase times; {t.one_step_off_total * st.steps / 3600:,.1f} h; needs disaggregated "
            "placement, which splits the GPUs: a lower bound)",
        ]
    lines += [f"  DOES NOT FIT: {problem}" for problem in sp.problems]
    return lines


def render(plan: Plan, eff: Efficiency, workload: Workload, suggestion: Plan | None,
           notes: list[str]) -> str:
    gpu = plan.gpu
    lines = [
        f"GPU {gpu.name}: {gpu.memory_bytes / GIB:.1f} GiB, {gpu.bf16_tflops:g} TFLOP/s bf16, HBM "
        f"{gpu.hbm_gbps:g} GB/s, NVLink {gpu.nvlink_gbps:g} GB/s, IB {gpu.ib_gbps:g} GB/s per GPU; "
        f"{plan.nodes} node(s) x {gpu.gpus_per_node}",
        "efficiency: " + ", ".join(f"{name}={value:g}" for name, value in eff.rows()),
        f"workload: mean prompt {workload.mean_prompt_tokens} tokens, mean response "
        f"{workload.response_fill:g} x max_response_length",
        "layout: " + describe_layout(plan.layout),
    ]
    lines += [f"note: {note}" for note in notes]
    lines += [f"DOES NOT FIT: {problem}" for problem in plan.problems]
    for sp in plan.stages:
        lines += [""] + _stage_lines(sp, plan.layout)
    lines.append("")
    if plan.fits:
        lines.append(f"FITS: peak {plan.peak / GIB:.1f} GiB of {gpu.memory_bytes / GIB:.1f} GiB per GPU")
    elif suggestion is None:
        lines.append("DOES NOT FIT, and no layout with larger TP/PP, recompute, a smaller micro-batch or "
                     "mem_fraction fits on up to 4x the nodes")
    else:
        overrides = " ".join(suggestion.layout.overrides(plan.layout))
        nodes = f" --nodes {suggestion.nodes}" if suggestion.nodes != plan.nodes else ""
        lines.append(f"DOES NOT FIT. Fits with:{nodes} {overrides}")
        lines.append(f"  peak {suggestion.peak / GIB:.1f} GiB per GPU; " + "; ".join(
            f"{sp.stage.key} step {sp.time.total:.0f} s" for sp in suggestion.stages if sp.time))
    return "\n".join(lines)
