"""Profile the fused logprob/entropy against the naive path and other kernels, side by side, in one run.

    python tools/profile_kernels.py --tokens 2048 --hidden 512 --vocab 32768 [--dtype float32]
        [--device cpu|cuda] [--tp N] [--temperature 1.0] [--vocab-chunk C] [--impl auto]
        [--compare liger,cce] [--peak-tflops P]

For each path (fused: `fused_logprob_entropy`; naive: fp32 [T, V_local] logits + log_softmax +
gather + entropy, Megatron-style all-reduces under TP; with --compare, Liger's fused linear
cross-entropy and Cut Cross-Entropy where importable, log-prob only, see `kernel_anchors.py`)
it prints the peak memory of one forward+backward, the forward and forward+backward times
(median of --repeats after a warm-up), the fraction of the matmul roofline that time reaches,
and the max abs error of values and gradients against the fp64 oracle (log-prob only for the
anchors, which compute no entropy). The last line is
``memory_ratio=<naive/fused> time_ratio=<fused/naive> max_err=<fused>`` plus
``time_vs_<anchor>=<fused/anchor>`` for each anchor that ran.

Roofline: forward + backward need at least 6*T*H*V_local matmul FLOPs (logits, hidden gradient,
weight gradient); the peak they are divided by is a large matmul in the profiled dtype, timed on
the same device in the same run (or --peak-tflops).

Peak memory is the increase over the memory held once the inputs exist, so that both paths are
charged for what they allocate (their gradients included) and nothing else:
- CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``;
- CPU: the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs),
  measured in a fresh subprocess per path, so the heap left behind by one path (or by the
  timing runs) cannot hide the other's allocations.
With ``--tp N`` the ranks are forked into a gloo group (CPU) and figures are the max over ranks.
The fp64 oracle is computed once per rank, outside every measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from or1_megatron.kernels import fused_logprob_entropy, naive_logprob_entropy  # noqa: E402
from or1_megatron.kernels.reference import max_abs_errors, oracle_outputs  # noqa: E402
from or1_megatron.plan.measure import matmul_tflops, median_seconds, reset_peak_rss, status_kib  # noqa: E402
from tools.kernel_anchors import ANCHORS, load_anchor  # noqa: E402

PATHS = ("fused", "naive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, required=True, help="T: tokens in the micro-batch")
    parser.add_argument("--hidden", type=int, required=True, help="H: hidden size")
    parser.add_argument("--vocab", type=int, required=True, help="V: (padded) vocabulary size over all TP ranks")
    parser.add_argument("--valid-vocab", type=int, default=None, help="unpadded vocabulary size (default: V)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks the vocabulary is split over")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--vocab-chunk", type=int, default=None, help="vocabulary columns per fused chunk (default: automatic)")
    parser.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto")
    parser.add_argument("--compare", default="", help=f"comma-separated other kernels to run beside ours: {','.join(ANCHORS)}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="matmul peak for the roofline (default: measured here)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-probe", choices=PATHS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("tokens", "hidden", "vocab", "tp", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.vocab % args.tp:
        parser.error(f"--vocab {args.vocab} must be divisible by --tp {args.tp} (Megatron pads it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    if args.device == "cuda" and args.tp > 1:
        parser.error("--tp > 1 is profiled on CPU (gloo) only; on GPUs run it under torchrun in the trainer")
    args.compare = [name for name in args.compare.split(",") if name]
    unknown = sorted(set(args.compare) - set(ANCHORS))
    if unknown:
        parser.error(f"--compare: unknown kernel(s) {', '.join(unknown)}; known: {', '.join(ANCHORS)}")
    return args


def make_inputs(args: argparse.Namespace, rank: int) -> dict:
    """The same full problem on every rank (from the seed); each rank keeps its weight shard."""
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    valid = args.valid_vocab or args.vocab
    v_local = args.vocab // args.tp
    # Weight scaled like a trained LM head: logits of O(1-10), a peaked but not one-hot softmax.
    full_weight = torch.randn(args.vocab, args.hidden, generator=gen).mul_(args.hidden ** -0.5 * 2).to(dtype)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype)
    targets = torch.randint(0, valid, (args.tokens,), generator=gen)
    g_lp, g_ent = torch.randn(args.tokens, generator=gen), torch.randn(args.tokens, generator=gen)
    shard = (rank * v_local, (rank + 1) * v_local)
    device = torch.device(args.device)
    return {
        "full_weight": full_weight,
        "hidden": hidden.to(device).requires_grad_(),
        "weight": full_weight[shard[0] : shard[1]].clone().to(device).requires_grad_(),
        "targets": targets.to(device),
        "g_lp": g_lp.to(device),
        "g_ent": g_ent.to(device),
        "shard": shard,
        "valid": valid,
    }


def _call(path: str, args: argparse.Namespace, inputs: dict, group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprob, entropy) of a path; entropy is None for the anchors, which compute none."""
    common = (inputs["hidden"], inputs["weight"], inputs["targets"], args.temperature, group, inputs["valid"])
    if path == "fused":
        return fused_logprob_entropy(*common, vocab_chunk=args.vocab_chunk, impl=args.impl)
    if path == "naive":
        return naive_logprob_entropy(*common)
    return args.anchors[path](inputs["hidden"], inputs["weight"], inputs["targets"], args.temperature), None


def _forward_backward(path: str, args: argparse.Namespace, inputs: dict, group) -> dict:
    logprob, entropy = _call(path, args, inputs, group)
    loss = inputs["g_lp"] * logprob
    if entropy is not None:
        loss = loss + inputs["g_ent"] * entropy
    grad_h, grad_w = torch.autograd.grad(loss.sum(), (inputs["hidden"], inputs["weight"]))
    if entropy is None:  # its gradients miss the entropy term: only the log-prob is comparable
        return {"logprob": logprob.detach()}
    return {"logprob": logprob.detach(), "entropy": entropy.detach(), "grad_hidden": grad_h, "grad_weight": grad_w}


def measure_peak_bytes(path: str, args: argparse.Namespace, inputs: dict, group) -> int:
    """Peak memory of one forward+backward above what the inputs already hold."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _forward_backward(path, args, inputs, group)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    reset_peak_rss()
    base = status_kib("VmRSS")
    out = _forward_backward(path, args, inputs, group)
    peak = status_kib("VmHWM") - base
    del out
    return peak * 1024


def _probe_rank(rank: int, world_size: int, args: argparse.Namespace) -> int:
    """CPU memory probe of one path on one rank, run in a fresh process (see module docstring)."""
    torch.set_num_threads(args.threads)
    group = torch.distributed.group.WORLD if world_size > 1 else None
    inputs = make_inputs(args, rank)
    del inputs["full_weight"]  # only the oracle needs it; not part of either path's footprint
    # Run the path once on a tiny problem first: lazy imports (autograd.Function machinery,
    # BLAS thread pools) cost tens of MiB of RSS once per process and belong to neither path.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 4, "hidden": 8, "vocab": 16 * args.tp, "valid_vocab": None})
    tiny_inputs = make_inputs(tiny, rank)
    _forward_backward(args.memory_probe, tiny, tiny_inputs, group)
    del tiny_inputs
    return measure_peak_bytes(args.memory_probe, args, inputs, group)


def _cpu_peak_bytes(path: str, argv: list[str]) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout.splitlines():
        if line.startswith("peak_bytes="):
            return int(line.split("=", 1)[1])
    raise RuntimeError(f"memory probe for {path} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def profile_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    """Times and oracle errors of both paths on one rank (peak memory too on CUDA)."""
    torch.set_num_threads(args.threads)
    group = torch.distributed.group.WORLD if world_size > 1 else None
    inputs = make_inputs(args, rank)
    # fp64 oracle on the profiled device, 512 tokens at a time (it holds [512, V] fp64 logits).
    oracle = oracle_outputs(
        inputs["hidden"], inputs["full_weight"].to(args.device), inputs["targets"], inputs["g_lp"],
        inputs["g_ent"], args.temperature, inputs["valid"], chunk_tokens=512,
    )
    del inputs["full_weight"]
    report = {}
    for path in (*PATHS, *args.anchors):
        entry = {}
        if args.device == "cuda":
            entry["peak_bytes"] = measure_peak_bytes(path, args, inputs, group)

        def forward():
            return _call(path, args, inputs, group)

        entry["forward_s"] = median_seconds(forward, torch.device(args.device), args.repeats)
        entry["forward_backward_s"] = median_seconds(lambda: _forward_backward(path, args, inputs, group), torch.device(args.device), args.repeats)
        result = _forward_backward(path, args, inputs, group)
        entry["errors"] = max_abs_errors(result, oracle, inputs["shard"])
        report[path] = entry
    return report


def _run_on_ranks(fn, args: argparse.Namespace):
    if args.tp == 1:
        return [fn(0, 1, args)]
    from or1_megatron.distributed.fork_launcher import run_forked

    return run_forked(fn, args.tp, args, timeout_s=3600)


def _load_anchors(args: argparse.Namespace) -> None:
    args.anchors = {}
    for name in args.compare:
        fn, why_not = load_anchor(name, torch.device(args.device), args.tp)
        if fn is None:
            print(f"{name:5s} skipped: {why_not}", flush=True)
        else:
            args.anchors[name] = fn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_probe is not None:
        args.anchors = {}
        print(f"peak_bytes={max(_run_on_ranks(_probe_rank, args))}")
        return 0
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab} valid={args.valid_vocab or args.vocab} "
        f"dtype={args.dtype} device={args.device} tp={args.tp} temperature={args.temperature} "
        f"impl={args.impl} vocab_chunk={args.vocab_chunk or 'auto'} threads/rank={args.threads} "
        f"repeats={args.repeats}",
        flush=True,
    )
    _load_anchors(args)
    torch.set_num_threads(args.threads)
    peak_tflops = args.peak_tflops or matmul_tflops(torch.device(args.device), getattr(torch, args.dtype))
    roofline_ms = 1e3 * 6 * args.tokens * args.hidden * (args.vocab // args.tp) / (peak_tflops * 1e12)
    print(f"roofline: 6*T*H*V_local FLOPs at {peak_tflops:.1f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'measured here'}) = {roofline_ms:.3g}ms", flush=True)
    per_rank = _run_on_ranks(profile_rank, args)
    summary = {}
    for path in (*PATHS, *args.anchors):
        entries = [rank_report[path] for rank_report in per_rank]
        peak = (
            max(entry["peak_bytes"] for entry in entries)
            if args.device == "cuda"
            else _cpu_peak_bytes(path, argv)
        )
        errors = {key: max(entry["errors"][key] for entry in entries) for key in entries[0]["errors"]}
        summary[path] = {
            "peak_mib": peak / 2**20,
            "forward_ms": 1e3 * max(entry["forward_s"] for entry in entries),
            "forward_backward_ms": 1e3 * max(entry["forward_backward_s"] for entry in entries),
            "max_err": max(errors.values()),
            "errors": errors,
        }
        s = summary[path]
        print(
            f"{path:5s} peak_mem={s['peak_mib']:.1f}MiB forward={s['forward_ms']:.1f}ms "
            f"forward+backward={s['forward_backward_ms']:.1f}ms "
            f"roofline_fraction={roofline_ms / s['forward_backward_ms']:.3g} max_err={s['max_err']:.3e} "
            f"errors={json.dumps({k: float(f'{v:.3e}') for k, v in errors.items()})}",
            flush=True,
        )
    fused, naive = summary["fused"], summary["naive"]
    versus = "".join(
        f" time_vs_{name}={fused['forward_backward_ms'] / summary[name]['forward_backward_ms']:.3f}"
        f" memory_vs_{name}={fused['peak_mib'] / max(summary[name]['peak_mib'], 1e-9):.2f}"
        for name in args.anchors
    )
    print(
        f"memory_ratio={naive['peak_mib'] / max(fused['peak_mib'], 1e-9):.2f} "
        f"time_ratio={fused['forward_backward_ms'] / naive['forward_backward_ms']:.3f} "
        f"max_err={fused['max_err']:.3e}{versus}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
