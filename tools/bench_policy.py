"""Policy training throughput, MFU and peak memory at a named model shape, beside the planner's
predictions, in one run.

    python tools/bench_policy.py --model qwen2.5-1.5b --micro-batch-tokens 4096 --micro-batches 8
        [--recompute none|selective|full] [--device cuda|cpu] [--dtype bf16|fp32]
        [--sequence-length L] [--steps 3] [--peak-tflops P] [--layers N]

--model is a Hugging Face config.json (or a directory holding one) or the name of a file in
configs/models/ (qwen2.5-0.5b, qwen2.5-1.5b, deepseek-r1-distill-qwen-7b, ...). The weights are
random (nothing is downloaded): throughput and memory do not depend on their values.

One rank (world size 1) builds the policy with the local layer spec, megatron's DDP and
distributed optimizer, exactly as `or1 train` does, and runs --steps timed optimizer steps (after
one warm-up step) over --micro-batches packed micro-batches of --micro-batch-tokens tokens,
each made of sequences of --sequence-length tokens (default: one sequence per micro-batch).
The loss is the token-mean NLL through the fused log-prob kernel.

Printed, with the formulas:
  tokens/s      = micro-batches x micro-batch tokens / median step time
  MFU           = 3 x forward FLOPs / step time / peak, where forward FLOPs per token =
                  2 x matmul parameters (all but the input embedding; the output layer counted
                  once when tied) + 4 x layers x heads x head_dim x (L + 1) / 2 (causal attention
                  over sequences of L tokens). Recomputed FLOPs are not counted (model FLOPs).
                  The peak is a bf16/fp32 matmul timed on the same device in the same run
                  (--peak-tflops to give one).
  peak memory   = torch.cuda.max_memory_allocated over the timed steps (CUDA); on CPU the
                  process's resident high-water mark (not comparable with the planner's figure)
  activations   = the bytes one micro-batch's forward saves for backward (plan.measure), beside
                  the planner's per-layer figure times the layers
  predicted     = `or1 plan`'s policy memory for this shape and layout (weights, gradients,
                  optimizer, activations, fused-kernel buffers; without its fixed overhead)
The last line is machine-readable: ``RESULT model=... tokens_per_s=... mfu=... peak_gib=...
predicted_gib=... memory_ratio=...`` (memory_ratio = predicted / measured).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from or1_megatron.config.schema import RECOMPUTE_MODES  # noqa: E402
from or1_megatron.convert.hf_config import load_arch  # noqa: E402
from or1_megatron.plan.memory import (  # noqa: E402
    GIB, activation_bytes_per_token_layer, policy_memory, stage_params_per_rank,
)
from or1_megatron.plan.step_time import forward_flops_per_token, matmul_params  # noqa: E402

MODELS = REPO / "configs" / "models"


def resolve_model(name: str) -> Path:
    """A config.json path from a path or a configs/models name."""
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        path = MODELS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODELS.glob("*.json")))
        raise SystemExit(f"bench_policy: --model {name!r}: no such config.json or configs/models name ({known})")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="config.json path or configs/models name")
    parser.add_argument("--micro-batch-tokens", type=int, required=True)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--sequence-length", type=int, default=None,
                        help="tokens per sequence (default: the micro-batch's tokens)")
    parser.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--layers", type=int, default=None, help="build only this many layers (smoke runs)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=None, help="matmul peak for MFU (default: measured here)")
    args = parser.parse_args(argv)
    for name in ("micro_batch_tokens", "micro_batches", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.sequence_length = args.sequence_length or args.micro_batch_tokens
    if not 2 <= args.sequence_length <= args.micro_batch_tokens:
        parser.error("--sequence-length must be in [2, --micro-batch-tokens]")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return args


def write_model(args: argparse.Namespace, out_dir: Path) -> Path:
    """The model's config.json, with --layers applied, in `out_dir`."""
    fields = json.loads(resolve_model(args.model).read_text())
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(fields))
    return out_dir


def sequences(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    per_micro_batch = args.micro_batch_tokens // args.sequence_length
    count = per_micro_batch * args.micro_batches
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.sequence_length,), generator=g).tolist() for _ in range(count)]


def rank_bench(rank: int, world: int, hf_dir: str, args: argparse.Namespace) -> dict:
    """Build the policy on this rank and time its train steps (CPU figures only leave the rank)."""
    from or1_megatron.config import load_config
    from or1_megatron.plan.measure import matmul_tflops, reset_peak_rss, saved_activation_bytes, status_kib
    from or1_megatron.policy.worker import PolicyWorker

    longest = args.sequence_length
    config = load_config(None, [
        f"model.hf_path={hf_dir}", "model.load_weights=false", f"model.dtype={args.dtype}",
        f"model.recompute={args.recompute}", "model.layer_spec=local",
        f"batch.micro_batch_tokens={args.micro_batch_tokens}",
        f"batch.max_prompt_length={max(1, longest // 2)}", f"batch.max_response_length={longest - longest // 2}",
        "batch.rollout_prompts=1", "batch.mini_batch_prompts=1", "batch.group_size=1",
    ])
    worker = PolicyWorker(config)
    device = worker.device
    seqs = sequences(args, worker.arch.vocab_size)
    total = sum(len(s) - 1 for s in seqs)

    def nll(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / total, {}

    def step() -> float:
        start = time.perf_counter()
        worker.train_step(seqs, nll)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    step()  # warm-up: allocator, compiled kernels, optimizer state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    times = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        peak = reserved = status_kib("VmHWM") * 1024
    # What one micro-batch's forward keeps for backward, counted tensor by tensor: the planner's
    # activation term, measured on its own (the peak also holds the state and the kernels' buffers).
    mb = worker.micro_batches(seqs)[0]
    model = worker.unwrapped
    _, activations = saved_activation_bytes(
        lambda: model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=None,
                      packed_seq_params=mb.packed_seq_params), exclude=model.parameters())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return {"step_s": statistics.median(times), "peak": peak, "reserved": reserved, "activations": activations,
            "peak_tflops": args.peak_tflops or matmul_tflops(device, dtype),
            "distributed_optimizer": config.parallel.distributed_optimizer, "padded_vocab": worker.padded_vocab}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from or1_megatron.distributed.fork_launcher import run_forked

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_model(args, Path(tmp) / "model")
        arch = load_arch(hf_dir)
        print(f"model {args.model} ({arch.num_layers} layers, hidden {arch.hidden_size}, ffn "
              f"{arch.ffn_hidden_size}, {arch.num_attention_heads}/{arch.num_key_value_heads} heads, "
              f"vocab {arch.vocab_size}, tied {arch.tie_word_embeddings}); {args.micro_batches} x "
              f"{args.micro_batch_tokens} tokens in sequences of {args.sequence_length}; recompute "
              f"{args.recompute}; {args.dtype} on {args.device}; {args.steps} timed steps", flush=True)
        if args.device == "cpu":
            from or1_megatron.policy import worker as _preload  # noqa: F401  (fork after importing megatron)
        backend = "nccl" if args.device == "cuda" else "gloo"
        result = run_forked(rank_bench, 1, str(hf_dir), args, backend=backend, timeout_s=3600)[0]

    padded = result["padded_vocab"]
    predicted = policy_memory(arch, tp=1, pp=1, dp=1, micro_batch_tokens=args.micro_batch_tokens,
                              padded_vocab=padded, recompute=args.recompute, sequence_parallel=False,
                              distributed_optimizer=result["distributed_optimizer"])
    params = stage_params_per_rank(arch, 1, 1, padded)[0]
    tokens = args.micro_batches * args.micro_batch_tokens
    flops_per_token = forward_flops_per_token(arch, matmul_params(arch, params, padded), (args.sequence_length + 1) / 2)
    step_s = result["step_s"]
    mfu = 3 * flops_per_token * tokens / step_s / (result["peak_tflops"] * 1e12)
    print(f"step {step_s * 1e3:.1f} ms (median of {args.steps}), {tokens / step_s:,.0f} tokens/s", flush=True)
    print(f"MFU {mfu:.3f}: 3 x {flops_per_token / 1e9:.4g} GFLOP/token x {tokens} tokens / "
          f"{step_s:.3f} s / {result['peak_tflops']:.1f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'matmul measured here'})")
    peak_gib = result["peak"] / GIB
    print(f"peak memory {peak_gib:.2f} GiB allocated ({result['reserved'] / GIB:.2f} GiB reserved)"
          + (" [CPU resident set: not comparable with the planner]" if args.device == "cpu" else ""))
    print("predicted by the planner (GiB): " + ", ".join(f"{name} {value:.3g}" for name, value in predicted.rows()))
    layer_bytes = activation_bytes_per_token_layer(arch, args.recompute) * args.micro_batch_tokens * arch.num_layers
    print(f"activations of one micro-batch's forward: measured {result['activations'] / GIB:.3g} GiB "
          f"(saved tensors, embedding and final norm included), planner's layers {layer_bytes / GIB:.3g} GiB")
    print(f"`tools/plan.py --efficiency train_mfu={mfu:.3f}` plans with this run's MFU; recorded in "
          "plan/calibration.py, it becomes the planner's default for this GPU")
    ratio = predicted.total / result["peak"]
    print(f"RESULT model={args.model} tokens={tokens} micro_batch_tokens={args.micro_batch_tokens} "
          f"recompute={args.recompute} dtype={args.dtype} device={args.device} "
          f"tokens_per_s={tokens / step_s:.1f} mfu={mfu:.4f} peak_gib={peak_gib:.3f} "
          f"predicted_gib={predicted.total / GIB:.3f} memory_ratio={ratio:.3f} "
          f"activations_gib={result['activations'] / GIB:.3f} predicted_activations_gib={layer_bytes / GIB:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
