"""`or1 check`: build the policy at a TP/PP/DP layout on this machine and check it end to end.

Makes a tiny random Qwen2 (or uses --hf-path), then at the requested layout: scores sequences
against transformers, trains one step and compares it with a single-process step. It is the
quickest way to see that megatron-core, the CPU patches (or the GPU stack) and the parallel
layout work here, and it prints every figure it compares.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

TOLERANCE = 1e-4


def _config(hf_path: str, tp: int, pp: int, world: int, dtype: str):
    from or1_megatron.config import load_config

    return load_config(None, [
        f"model.hf_path={hf_path}", f"model.dtype={dtype}",
        f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
        f"parallel.world_size={world}", "batch.micro_batch_tokens=64", "batch.max_prompt_length=16",
        "batch.max_response_length=32", "batch.rollout_prompts=4", "batch.mini_batch_prompts=4",
        "batch.group_size=2", "optim.lr=1e-4",
    ])


def _sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (17, 9, 30, 4, 23)]


def _nll(total_tokens: int):
    def loss(logprob, entropy, mb):
        return -(logprob * mb.target_mask).sum() / total_tokens, {}
    return loss


def _rank(rank: int, world: int, hf_path: str, tp: int, pp: int, dtype: str, vocab: int):
    from or1_megatron.policy.worker import PolicyWorker

    worker = PolicyWorker(_config(hf_path, tp, pp, world, dtype))
    seqs = _sequences(vocab)
    start = time.perf_counter()
    scores = worker.compute_logprobs(seqs)
    score_s = time.perf_counter() - start
    mine = seqs[worker.layout.dp_rank::worker.layout.dp_size]
    start = time.perf_counter()
    metrics = worker.train_step(mine, _nll(sum(len(s) - 1 for s in seqs)))
    step_s = time.perf_counter() - start
    return {"logprob": scores and torch.cat([s.logprob for s in scores]), "metrics": metrics,
            "score_s": score_s, "step_s": step_s}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="or1 check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--dp", type=int, default=1, help="data parallel size")
    parser.add_argument("--hf-path", help="HF Qwen2 checkpoint dir (default: a tiny random one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="cuda: one GPU per rank over NCCL (auto: cuda if enough GPUs)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                        help="default: bf16 on GPUs, fp32 on CPU")
    args = parser.parse_args(argv)

    from or1_megatron.convert.hf_config import load_arch
    from or1_megatron.distributed.fork_launcher import LaunchError, check_backend, run_forked
    from or1_megatron.policy.oracle import transformers_oracle
    from or1_megatron.tiny_model import make_tiny_qwen2

    world = args.tp * args.pp * args.dp
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = args.device if args.device != "auto" else ("cuda" if gpus >= world else "cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    try:
        check_backend(backend, world)
    except LaunchError as exc:
        print(f"or1 check: error: {exc}")
        return 2
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    if device == "cpu":
        # Import megatron once here, then fork the CPU ranks (GPU ranks are spawned: a process
        # that imported megatron has initialised CUDA and cannot fork GPU ranks).
        from or1_megatron.policy import worker as _preload  # noqa: F401
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = args.hf_path or str(make_tiny_qwen2(Path(tmp) / "tiny_qwen2", num_layers=4))
        vocab = load_arch(hf_path).vocab_size
        print(f"or1 check: policy {hf_path} at TP={args.tp} PP={args.pp} DP={args.dp} "
              f"({world} ranks on {device}, {backend}), dtype {dtype}")
        start = time.perf_counter()
        single = run_forked(_rank, 1, hf_path, 1, 1, dtype, vocab, backend=backend)[0]
        parallel = run_forked(_rank, world, hf_path, args.tp, args.pp, dtype, vocab, backend=backend)
        last = next(r for r in reversed(parallel) if r["logprob"] is not None)
        oracle = torch.cat([o["logprob"] for o in transformers_oracle(hf_path, _sequences(vocab))])
        elapsed = time.perf_counter() - start

    checks = {
        "logprob vs transformers (max abs diff)": (last["logprob"].double() - oracle).abs().max().item(),
        "logprob parallel vs single": (last["logprob"] - single["logprob"]).abs().max().item(),
        "loss parallel vs single": abs(last["metrics"]["loss"] - single["metrics"]["loss"]),
        "grad norm parallel vs single (relative)":
            abs(last["metrics"]["grad_norm"] / single["metrics"]["grad_norm"] - 1),
    }
    tolerance = TOLERANCE if dtype == "fp32" else 5e-2
    ok = True
    for name, value in checks.items():
        verdict = "ok" if value <= tolerance else "FAILED"
        ok &= verdict == "ok"
        print(f"  {name:42s} {value:.2e}  {verdict}")
    print(f"  logprob pass {last['score_s'] * 1e3:.0f} ms, train step {last['step_s'] * 1e3:.0f} ms, "
          f"loss {last['metrics']['loss']:.4f}, grad norm {last['metrics']['grad_norm']:.4f}; "
          f"total {elapsed:.1f} s")
    print("or1 check: " + ("all checks passed" if ok else f"FAILED (tolerance {tolerance:g})"))
    return 0 if ok else 1
