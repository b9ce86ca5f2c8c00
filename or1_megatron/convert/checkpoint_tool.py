"""`or1 convert` / tools/convert_checkpoint.py: Hugging Face <-> Megatron dist checkpoints.

hf-to-mcore  validates the HF checkpoint completely (architecture, every tensor present once,
             nothing left over, every shape) before writing anything, then loads it into the
             policy at TP x PP on forked ranks and saves a Megatron dist checkpoint that the
             trainer loads at any layout (`model.megatron_checkpoint`).
mcore-to-hf  loads a dist checkpoint at TP x PP, streams full HF tensors out of it (one
             gathered parameter at a time) into safetensors shards with an index, and writes
             config.json plus the tokenizer/generation files carried over from the source.
Both use the one Qwen2 mapping (convert/qwen2.py) that the weight sync uses.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from or1_megatron.config.schema import ModelConfig
from or1_megatron.convert.hf_config import Qwen2Arch, layout_problems, load_arch, padded_vocab_size
from or1_megatron.convert.hf_export import (DEFAULT_MAX_SHARD_GB, HF_SUBDIR, assemble_hf_checkpoint,
                                            carry_hf_files, write_stage_shards)
from or1_megatron.convert.qwen2 import Qwen2Mapping, check_names
from or1_megatron.convert.safetensors_io import SafetensorsReader
from or1_megatron.errors import CheckpointError, OR1Error

DTYPE_NAMES = ("fp32", "bf16")  # torch dtypes: or1_megatron.policy.model.DTYPES


@dataclass
class Layout:
    tp: int
    pp: int
    dtype: str
    # The embedding's rows are padded to a multiple of this: the trainer's default, so a
    # converted checkpoint loads with the default config (mcore-to-hf takes the checkpoint's).
    vocab_multiple: int = ModelConfig.make_vocab_size_divisible_by

    @property
    def world(self) -> int:
        return self.tp * self.pp


def _parallel_config(layout: Layout):
    from or1_megatron.config.schema import ParallelConfig

    return ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                          world_size=layout.world, distributed_optimizer=False)


def check_layout(arch: Qwen2Arch, layout: Layout) -> None:
    problems = layout_problems(arch, layout.tp, layout.pp)
    if problems:
        flags = {"tensor_parallel": "--tp", "pipeline_parallel": "--pp"}
        raise CheckpointError("; ".join(f"{flags[key]} {reason}" for key, reason in problems))


def _mapping(arch: Qwen2Arch, layout: Layout) -> Qwen2Mapping:
    return Qwen2Mapping(arch, padded_vocab_size(arch.vocab_size, layout.vocab_multiple, layout.tp))


def validate_hf_checkpoint(hf_dir: Path, mapping: Qwen2Mapping) -> SafetensorsReader:
    """Every expected tensor exactly once, nothing unexpected, every shape right: or a named error."""
    reader = SafetensorsReader(hf_dir)
    check_names(reader.names(), mapping.hf_names(), where=str(hf_dir))
    for name, expected in mapping.hf_shapes().items():
        found = reader.shape(name)
        if found != expected:
            raise CheckpointError(f"{hf_dir}: tensor {name} has shape {found}, expected {expected} "
                                  f"(from {hf_dir / 'config.json'})")
    return reader


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- ranks ------------------------------------------------------------------------------------

def _build_stage(arch: Qwen2Arch, layout: Layout, meta: bool = False):
    from or1_megatron.policy.model import build_policy_model
    from or1_megatron.policy.parallel import init_parallel

    rank_layout = init_parallel(_parallel_config(layout), seed=0)
    model_cfg = ModelConfig(hf_path="", dtype=layout.dtype, layer_spec="local",
                            make_vocab_size_divisible_by=layout.vocab_multiple)
    # The converter's ranks are gloo ranks: they compute on the CPU even where GPUs exist.
    assert rank_layout.device.type == "cpu", rank_layout.device
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_policy_model(arch, model_cfg, _parallel_config(layout),
                                   pre_process=rank_layout.is_first_stage,
                                   post_process=rank_layout.is_last_stage,
                                   pp_rank=rank_layout.pp_rank, initialize=False,
                                   device=rank_layout.device)
    return model, rank_layout


def _rank_check_shapes(rank: int, world: int, arch: Qwen2Arch, layout: Layout) -> list[str]:
    """Dry run: build this rank's stage on the meta device; compare every shape with the mapping."""
    from or1_megatron.convert.qwen2 import canonical_mcore_name, layer_offset

    model, rl = _build_stage(arch, layout, meta=True)
    mapping = _mapping(arch, layout)
    offset = layer_offset(arch.num_layers, rl.pp_rank, rl.pp_size)
    problems = []
    for name, param in model.named_parameters():
        entry = mapping.get(canonical_mcore_name(name, offset))
        if tuple(param.shape) != mapping.mcore_shard_shape(entry, layout.tp):
            problems.append(f"rank {rank} {name}: megatron {tuple(param.shape)} vs mapping "
                            f"{mapping.mcore_shard_shape(entry, layout.tp)}")
    return problems


def _rank_hf_to_mcore(rank: int, world: int, hf_dir: str, arch: Qwen2Arch, layout: Layout, out: str) -> dict:
    from or1_megatron.policy.checkpoint import PolicyState, save_checkpoint
    from or1_megatron.policy.hf_weights import load_hf_weights
    from or1_megatron.progress import Progress

    model, rl = _build_stage(arch, layout)
    mapping = _mapping(arch, layout)
    stage_tensors = sum(len(m.hf_names) for m in mapping.stage_entries(rl.pp_rank, rl.pp_size))
    progress = Progress(stage_tensors, f"hf-to-mcore stage {rl.pp_rank} tensors") if rl.tp_rank == 0 else None
    read_bytes = 0

    def on_tensor(nbytes: int) -> None:
        nonlocal read_bytes
        read_bytes += nbytes
        if progress:
            progress.update(1, nbytes)

    load_hf_weights(model, hf_dir, mapping, rl, on_tensor)
    state = PolicyState(model=model, arch=arch, padded_vocab=mapping.padded_vocab_size,
                        layout={"tensor_parallel": layout.tp, "pipeline_parallel": layout.pp,
                                "world_size": layout.world, "dtype": layout.dtype})
    save_checkpoint(state, out, extra_state={"converted_from": hf_dir})
    # Every TP rank of a stage reads the stage's tensors; count them once.
    return {"read_bytes": read_bytes if rl.tp_rank == 0 else 0, "peak_rss_mb": _peak_rss_mb()}


def _rank_mcore_to_hf(rank: int, world: int, mcore_dir: str, arch: Qwen2Arch, layout: Layout,
                      staging: str, max_shard_bytes: int) -> dict:
    from or1_megatron.policy.checkpoint import PolicyState, load_checkpoint
    from or1_megatron.policy.model import DTYPES

    model, rl = _build_stage(arch, layout)
    mapping = _mapping(arch, layout)
    load_checkpoint(PolicyState(model=model, arch=arch, padded_vocab=mapping.padded_vocab_size,
                                layout={}), mcore_dir)
    written = write_stage_shards(model, mapping, rl, staging, max_shard_bytes, DTYPES[layout.dtype],
                                 writer=rl.tp_rank == 0)
    return {**written, "peak_rss_mb": _peak_rss_mb()}


# -- commands ---------------------------------------------------------------------------------

def _stats_line(nbytes: int, seconds: float, per_rank: list[dict]) -> str:
    peak = max(r["peak_rss_mb"] for r in per_rank)
    total = sum(r["peak_rss_mb"] for r in per_rank)
    return (f"stats: bytes={nbytes} seconds={seconds:.2f} gbps={nbytes / max(seconds, 1e-9) / 1e9:.3f} "
            f"peak_rss_mb_max_rank={peak:.0f} peak_rss_mb_all_ranks={total:.0f} ranks={len(per_rank)}")


def hf_to_mcore(hf_dir: Path, out: Path, layout: Layout, dry_run: bool = False, stats: bool = False) -> None:
    from or1_megatron.distributed.fork_launcher import run_forked

    arch = load_arch(hf_dir)
    check_layout(arch, layout)
    mapping = _mapping(arch, layout)
    shapes = mapping.hf_shapes()
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"hf-to-mcore: {arch.architecture} with {len(shapes)} tensors, {params:,} parameters; "
          f"target TP={layout.tp} PP={layout.pp} {layout.dtype}")
    if dry_run:
        if hf_dir.is_dir() and any(hf_dir.glob("*.safetensors")):
            validate_hf_checkpoint(hf_dir, mapping)
            print("hf-to-mcore: source checkpoint complete and every shape matches")
        problems = [p for r in run_forked(_rank_check_shapes, layout.world, arch, layout) for p in r]
        if problems:
            raise CheckpointError("megatron shapes differ from the mapping: " + "; ".join(problems[:5]))
        print(f"hf-to-mcore: dry run ok: {len(shapes)} tensors, {params:,} parameters, "
              f"every TP/PP shard shape matches the megatron model (meta device); nothing written")
        return
    validate_hf_checkpoint(hf_dir, mapping)  # before anything is written
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new output directory")
    start = time.perf_counter()
    per_rank = run_forked(_rank_hf_to_mcore, layout.world, str(hf_dir), arch, layout, str(out),
                          timeout_s=24 * 3600)
    carry_hf_files(hf_dir, out / HF_SUBDIR)
    seconds = time.perf_counter() - start
    print(f"hf-to-mcore: wrote {out} (Megatron dist checkpoint; loads at any TP/PP)")
    if stats:
        print(_stats_line(sum(r["read_bytes"] for r in per_rank), seconds, per_rank))


def mcore_to_hf(mcore_dir: Path, out: Path, layout: Layout, max_shard_gb: float = DEFAULT_MAX_SHARD_GB,
                stats: bool = False) -> None:
    from or1_megatron.distributed.fork_launcher import run_forked
    from or1_megatron.policy.checkpoint import read_metadata

    meta = read_metadata(mcore_dir)
    arch = Qwen2Arch(**meta["arch"])
    check_layout(arch, layout)
    # Loaded with the padding it was saved with (a run may pad to another multiple than ours).
    layout = replace(layout, vocab_multiple=int(meta["padded_vocab_size"]))
    if layout.vocab_multiple % layout.tp:
        raise CheckpointError(f"{mcore_dir}: its {layout.vocab_multiple} vocabulary rows do not "
                              f"split over --tp {layout.tp}")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: exists and is not empty; choose a new output directory")
    print(f"mcore-to-hf: {mcore_dir} ({arch.architecture}, saved at TP={meta['saved_with'].get('tensor_parallel')} "
          f"PP={meta['saved_with'].get('pipeline_parallel')}) loaded at TP={layout.tp} PP={layout.pp}, "
          f"writing {layout.dtype}")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        per_rank = run_forked(_rank_mcore_to_hf, layout.world, str(mcore_dir), arch, layout, staging,
                              int(max_shard_gb * 1e9), timeout_s=24 * 3600)
        files = [f for r in per_rank for f in r["files"]]
        counts = assemble_hf_checkpoint(files, Path(staging), out, arch, _mapping(arch, layout),
                                        mcore_dir / HF_SUBDIR, layout.dtype, where=str(mcore_dir))
        Path(staging).mkdir()  # TemporaryDirectory removes it on exit
    seconds = time.perf_counter() - start
    print(f"mcore-to-hf: wrote {out} ({counts['shards']} safetensors shards, {counts['tensors']} tensors)")
    if stats:
        print(_stats_line(counts["bytes"], seconds, per_rank))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="or1 convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, type=Path,
                          help="HF checkpoint dir (or a config.json with --dry-run)")
    to_mcore.add_argument("--out", type=Path)
    to_mcore.add_argument("--dry-run", action="store_true",
                          help="validate and check every shard shape on the meta device; write nothing")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("--mcore-dir", required=True, type=Path)
    to_hf.add_argument("--out", required=True, type=Path)
    to_hf.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB)
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor parallel ranks used for the conversion")
        p.add_argument("--pp", type=int, default=1, help="pipeline parallel ranks used for the conversion")
        p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16")
        p.add_argument("--stats", action="store_true", help="print bytes, seconds, GB/s and peak RSS")
    args = parser.parse_args(argv)
    layout = Layout(args.tp, args.pp, args.dtype)
    # Import megatron once here, so forked ranks start in well under a second.
    from or1_megatron.policy import model as _preload  # noqa: F401

    torch.set_num_threads(1)
    try:
        if args.direction == "hf-to-mcore":
            if args.out is None and not args.dry_run:
                parser.error("--out is required unless --dry-run")
            hf_to_mcore(args.hf_dir, args.out, layout, dry_run=args.dry_run, stats=args.stats)
        else:
            mcore_to_hf(args.mcore_dir, args.out, layout, args.max_shard_gb, stats=args.stats)
    except OR1Error as exc:
        print(f"or1 convert: error: {exc}", file=sys.stderr)
        return 2
    return 0
