"""Benchmark: the CPU engine's generated tokens/s against `transformers` generate, same batch, one run.

Builds a small random Qwen2 (`or1_megatron.tiny_model`, no hub access), then generates the same batch of prompts with the
same greedy settings three ways and prints tokens/s and the ratios:
  - transformers `generate` (padded batch, KV cache),
  - the CPU engine in-process (`CpuEngine.submit`),
  - the CPU engine over HTTP (`or1 serve` in a subprocess, driven by `HttpEngine`).
Outputs of the engine and of `generate` are compared token by token. Each path runs
`--repeats` times, interleaved, and the fastest run counts: on shared CPUs the others' load is
noise, not the code's speed.

    python tools/bench_engine.py --batch 16 --prompt-len 32 --new-tokens 128
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from or1_megatron.rollout import protocol  # noqa: E402
from or1_megatron.rollout.cpu_engine import CpuEngine  # noqa: E402
from or1_megatron.rollout.engine import HttpEngine  # noqa: E402
from or1_megatron.rollout.launcher import CpuEngineProcess  # noqa: E402
from or1_megatron.tiny_model import make_tiny_qwen2  # noqa: E402


def build_model(path: Path, args: argparse.Namespace) -> None:
    make_tiny_qwen2(path, vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=args.hidden * 3, num_layers=args.layers,
                    num_heads=max(1, args.hidden // 32), num_kv_heads=max(1, args.hidden // 128),
                    max_position_embeddings=4096)


def bench_transformers(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as generate wants for decoder-only
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    seconds = time.perf_counter() - start
    return seconds, out[:, width:].tolist()


def samples(prompts: list[list[int]], new_tokens: int) -> list[protocol.SampleRequest]:
    params = protocol.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [protocol.SampleRequest(f"b{i}", p, params, return_logprob=True) for i, p in enumerate(prompts)]


def bench_engine(engine: CpuEngine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    results = engine.submit(samples(prompts, new_tokens)).result(timeout=3600)
    return time.perf_counter() - start, [r["output_ids"] for r in results]


async def bench_http(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    client = HttpEngine(url)
    try:
        params = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        start = time.perf_counter()
        results = await client.generate(prompts, params)
        return time.perf_counter() - start, [r.output_ids for r in results]
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per path, interleaved; the best is reported (shared CPUs are noisy)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP server measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(1)
    # Ragged prompts (half to full length), as rollouts have.
    prompts = [torch.randint(1, args.vocab - 1, (int(args.prompt_len * (0.5 + 0.5 * i / max(1, args.batch - 1))),),
                             generator=generator).tolist() for i in range(args.batch)]
    total = args.batch * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        build_model(path, args)
        engine = CpuEngine(path, max_running_requests=args.batch)
        engine.start()
        try:
            bench_engine(engine, prompts[:2], 4)  # warm-up both paths
            bench_transformers(engine.model, prompts[:2], 4)
            hf_runs, eng_runs = [], []
            for _ in range(args.repeats):
                hf_runs.append(bench_transformers(engine.model, prompts, args.new_tokens))
                eng_runs.append(bench_engine(engine, prompts, args.new_tokens))
            hf_s, hf_out = min(hf_runs)
            eng_s, eng_out = min(eng_runs)
        finally:
            engine.shutdown()
        rows = [("transformers generate", hf_s), ("CPU engine (in-process)", eng_s)]
        http_out = None
        if not args.no_http:
            process = CpuEngineProcess(path, num_threads=args.threads, max_running_requests=args.batch)
            process.start()
            try:
                process.wait_ready(120)
                asyncio.run(bench_http(process.url, prompts[:2], 4))
                http_s, http_out = min(asyncio.run(bench_http(process.url, prompts, args.new_tokens))
                                       for _ in range(args.repeats))
                rows.append(("CPU engine (HTTP, or1 serve)", http_s))
            finally:
                process.kill()

    print(f"batch {args.batch} x {args.new_tokens} new tokens, prompts {args.prompt_len // 2}-"
          f"{args.prompt_len} tokens, Qwen2 hidden {args.hidden} x {args.layers} layers, vocab "
          f"{args.vocab}, fp32, {args.threads} thread(s), best of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:30s} {total / seconds:9.1f} tokens/s  ({seconds:.2f} s, "
              f"{hf_s / seconds:.2f}x transformers)")
    same = sum(a == b for a, b in zip(eng_out, hf_out))
    print(f"  greedy outputs identical to transformers: {same}/{len(prompts)} sequences"
          + ("" if http_out is None else f", HTTP identical to in-process: {http_out == eng_out}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
