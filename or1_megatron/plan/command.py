"""`tools/plan.py`: memory per GPU and step time of a run config's layout on N nodes.

    python tools/plan.py --config CONFIG --nodes N --gpu h100-80gb [--mean-prompt-tokens T]
        [--response-fill F] [--efficiency name=value ...] [key=value ...]

Prints the GPU's peaks, the efficiency factors and workload assumptions it used, per stage the
policy's and SGLang's memory per GPU and a rollout / logprob / train / sync time estimate, and
whether the layout fits; when it does not, why, and the least-changed overrides that would.
Exit status: 0 fits, 1 does not fit, 2 bad input. Colocated configs are planned on all the
nodes' GPUs (parallel.world_size and rollout.engines scaled to them unless given as overrides).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from or1_megatron.config.loader import load_config
from or1_megatron.config.schema import OR1Config
from or1_megatron.config.stages import resolve_stages
from or1_megatron.convert.hf_config import load_arch
from or1_megatron.errors import OR1Error
from or1_megatron.plan.fit import Plan, evaluate, suggest
from or1_megatron.plan.calibration import measured_train_mfu
from or1_megatron.plan.hardware import GPUS, GPU, Efficiency
from or1_megatron.plan.layout import Layout
from or1_megatron.plan.report import render
from or1_megatron.plan.step_time import Workload


def scale_to_nodes(cfg: OR1Config, gpu: GPU, nodes: int, overrides: list[str]) -> list[str]:
    """Overrides that spread a colocated layout over every GPU of `nodes` (none if already so)."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    gpus = nodes * gpu.gpus_per_node
    if cfg.rollout.placement != "colocated" or "parallel.world_size" in given:
        return []
    extra = []
    if cfg.parallel.world_size != gpus:
        extra.append(f"parallel.world_size={gpus}")
    if "rollout.engines" not in given and cfg.rollout.engines * cfg.rollout.engine_tp != gpus:
        extra.append(f"rollout.engines={max(1, gpus // cfg.rollout.engine_tp)}")
    return extra


def calibrated_efficiency(gpu: str, overrides: list[str]) -> tuple[Efficiency, str]:
    """The efficiency factors with train_mfu measured on `gpu` where a measurement exists (unless
    --efficiency sets it), and a note saying where train_mfu came from."""
    eff = Efficiency()
    given = any(item.partition("=")[0] == "train_mfu" for item in overrides)
    measured = measured_train_mfu(gpu)
    if given:
        note = "train_mfu given on the command line"
    elif measured is not None:
        eff = replace(eff, train_mfu=measured.mfu)
        note = f"train_mfu measured by tools/bench_policy.py: {measured.describe()}"
    else:
        note = (f"train_mfu={eff.train_mfu:g} is an assumption: nothing measured on {gpu} yet "
                "(tools/bench_policy.py measures it; pass --efficiency train_mfu=...)")
    return eff.with_overrides(overrides), note


def build_plan(config_path: str, overrides: list[str], gpu: GPU, nodes: int, eff: Efficiency,
               workload: Workload) -> tuple[Plan, Plan | None, list[str]]:
    """(plan, suggestion when it does not fit, notes) for a config file and overrides."""
    cfg = load_config(config_path, overrides)
    notes = []
    scaled = scale_to_nodes(cfg, gpu, nodes, overrides)
    if scaled:
        notes.append(f"planning {nodes} node(s) of {gpu.gpus_per_node} GPUs: {' '.join(scaled)} "
                     f"(the config has parallel.world_size={cfg.parallel.world_size}, "
                     f"rollout.engines={cfg.rollout.engines})")
        cfg = load_config(config_path, overrides + scaled)
    if cfg.tiny_model.enabled:
        raise OR1Error(f"{config_path}: tiny_model.enabled: the planner sizes real models; "
                       "point model.hf_path at a config.json")
    arch = load_arch(cfg.model.hf_path)
    layout, stages = Layout.from_config(cfg), resolve_stages(cfg)
    plan = evaluate(arch, layout, stages, gpu, nodes, eff, workload)
    suggestion = None if plan.fits else suggest(arch, layout, stages, gpu, nodes, eff, workload)
    return plan, suggestion, notes


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of --gpu")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    parser.add_argument("--mean-prompt-tokens", type=int, default=Workload.mean_prompt_tokens)
    parser.add_argument("--response-fill", type=float, default=Workload.response_fill,
                        help="mean response length as a fraction of the stage's max_response_length")
    parser.add_argument("--efficiency", action="append", default=[], metavar="NAME=VALUE",
                        help="override an efficiency factor (repeatable), e.g. train_mfu=0.3")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.recompute=selective")
    args = parser.parse_intermixed_args(argv)
    if args.nodes < 1 or args.mean_prompt_tokens < 1 or not 0 < args.response_fill <= 1:
        parser.error("--nodes and --mean-prompt-tokens must be >= 1 and --response-fill in (0, 1]")
    try:
        eff, mfu_note = calibrated_efficiency(args.gpu, args.efficiency)
    except ValueError as exc:
        parser.error(str(exc))
    workload = Workload(args.mean_prompt_tokens, args.response_fill)
    try:
        plan, suggestion, notes = build_plan(args.config, args.overrides, GPUS[args.gpu], args.nodes,
                                             eff, workload)
    except OR1Error as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    print(render(plan, eff, workload, suggestion, [mfu_note, *notes]))
    return 0 if plan.fits else 1
