"""Weight-sync bandwidth against the machine's memcpy bandwidth, measured in the same run.

Builds a random Qwen2 of about --model-size bytes (fp32), a Megatron trainer at --tp x --pp
(forked gloo ranks; with --device cuda spawned NCCL ranks, one GPU each), --engines torch engine
processes (`or1 serve`, on the CPU or on the first GPU), and times full syncs (pause ..
continue) over --transport (on GPUs, colocated means CUDA IPC handles). The first sync is checked with the probe batch (engine log-probs == the
trainer's); it and a second one are warm-ups, printed but not timed (a CPU engine keeps the
sender's shared-memory files mapped from their second sighting on, as it would over a
training run's hundreds of syncs). Prints one line per timed sync, then

    transport=<t> gbps=<x> memcpy_gbps=<y> ratio=<x/y>

where x = bytes delivered to all engines / median sync seconds, and y = the median, over the
timed syncs, of the best of three single-thread copies of a 256 MiB buffer made just before
each sync (every rank and engine runs one torch thread); on a GPU, device-to-device copies.

    python tools/bench_weight_sync.py --model-size 400M --tp 1 --pp 1 --transport colocated
    python tools/bench_weight_sync.py --model-size 1G --device cuda --transport colocated
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from or1_megatron.config import load_config  # noqa: E402
from or1_megatron.config.schema import SyncConfig  # noqa: E402
from or1_megatron.distributed.rank_group import RankGroup  # noqa: E402
from or1_megatron.policy.worker import PolicyWorker  # noqa: E402
from or1_megatron.rollout.launcher import CpuEngineProcess  # noqa: E402
from or1_megatron.sync.coordinator import WeightSyncCoordinator  # noqa: E402
from or1_megatron.sync.sender import WeightSender  # noqa: E402
from or1_megatron.tiny_model import make_tiny_qwen2  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 1024, 16, 4, 2816, 32000


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def model_shape(size_bytes: int, pp: int) -> dict:
    """A Qwen2 shape of about `size_bytes` fp32 weights with a layer count divisible by pp."""
    d = HIDDEN // HEADS
    per_layer = (HIDDEN * HIDDEN * 2 + HIDDEN + 2 * (HIDDEN * KV_HEADS * d + KV_HEADS * d)
                 + 3 * HIDDEN * FFN + 2 * HIDDEN) * 4
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 4
    layers = max(pp, round(max(0, size_bytes - fixed) / per_layer / pp) * pp)
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=layers,
                num_heads=HEADS, num_kv_heads=KV_HEADS, max_position_embeddings=256)


class Memcpy:
    """The machine's single-thread copy bandwidth, measured again next to every sync: this
    machine's bandwidth drifts by +-20% from one minute to the next."""

    def __init__(self, size: int = 256 << 20, device: str = "cpu"):
        torch.set_num_threads(1)
        self.device = torch.device(device)
        self.src = torch.ones(size, dtype=torch.uint8, device=self.device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gbps(self, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            self._sync()
            start = time.perf_counter()
            self.dst.copy_(self.src)
            self._sync()
            best = min(best, time.perf_counter() - start)
        return self.src.numel() / best / 1e9


# -- trainer ranks (forked) -------------------------------------------------------------------

def setup_rank(rank, world, hf_dir, tp, pp):
    overrides = {"model.hf_path": hf_dir, "model.dtype": "fp32", "parallel.tensor_parallel": tp,
                 "parallel.pipeline_parallel": pp, "parallel.world_size": world,
                 "batch.micro_batch_tokens": 64, "batch.max_prompt_length": 16,
                 "batch.max_response_length": 16, "batch.rollout_prompts": 1,
                 "batch.mini_batch_prompts": 1, "batch.group_size": 1}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return {"worker": PolicyWorker(config), "sender": WeightSender()}


def push_rank(state, plan):
    return state["sender"].push(state["worker"], plan)


def score_rank(state, sequences):
    results = state["worker"].compute_logprobs(sequences)
    return None if results is None else [r.logprob.tolist() for r in results]


# -- driver -----------------------------------------------------------------------------------

async def bench(args, hf_dir: str, engines: list[CpuEngineProcess], group: RankGroup,
                memcpy: Memcpy) -> tuple[list, list[float]]:
    config = SyncConfig(transport=args.transport, bucket_mb=args.bucket_mb, verify=True,
                        verify_tolerance=args.verify_tolerance, timeout_s=args.timeout_s,
                        disk_dir=str(Path(args.work_dir) / "weights"),
                        share_parameters=args.device == "cpu")
    coordinator = WeightSyncCoordinator(engines, config, vocab_size=VOCAB, hf_config_dir=hf_dir)

    def push(plan):
        return group.call(push_rank, plan, timeout_s=args.timeout_s)

    def score(sequences):
        return next(r for r in group.call(score_rank, sequences) if r is not None)

    try:
        first = await coordinator.sync(push, score)
        print(f"checked sync: version {first.version}, max |logprob diff| per engine "
              f"{first.verify_max_diff}, {first.seconds:.3f} s", flush=True)
        warm_up = await coordinator.sync(push, score=None)
        print(f"warm-up sync: version {warm_up.version}, {warm_up.seconds:.3f} s", flush=True)
        reports, copies = [], []
        for _ in range(args.repeats):
            copies.append(memcpy.gbps())
            report = await coordinator.sync(push, score=None)
            reports.append(report)
            moved = report.bytes_per_engine * report.engines
            print(f"sync {report.version}: {moved / 1e6:.1f} MB to {report.engines} engine(s) in "
                  f"{report.buckets} buckets, {report.seconds:.3f} s (push {report.push_seconds:.3f} s) "
                  f"= {moved / report.seconds / 1e9:.2f} GB/s; memcpy just before: "
                  f"{copies[-1]:.2f} GB/s", flush=True)
        return reports, copies
    finally:
        await coordinator.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="400M", help="fp32 weight bytes, e.g. 400M, 1.2G")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--transport", default="colocated", choices=["colocated", "distributed", "disk"])
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: trainer ranks on GPUs 0.., the engines on GPU 0")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verify-tolerance", type=float, default=1e-3)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--work-dir", default="", help="model and disk-transport files (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="or1_bench_sync_", dir="/tmp") as tmp:
        args.work_dir = args.work_dir or tmp
        shape = model_shape(parse_size(args.model_size), args.pp)
        start = time.perf_counter()
        hf_dir = str(make_tiny_qwen2(Path(args.work_dir) / "model", **shape))
        print(f"model: {shape['num_layers']} layers, hidden {HIDDEN}, vocab {VOCAB}, "
              f"{sum(f.stat().st_size for f in Path(hf_dir).glob('*.safetensors')) / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - start:.0f} s)", flush=True)
        memcpy = Memcpy(device=args.device)
        engines = [CpuEngineProcess(hf_dir, num_threads=1, log_dir=Path(args.work_dir) / "logs",
                                    start_timeout_s=args.timeout_s, device=args.device)
                   for _ in range(args.engines)]
        group = None
        try:
            for engine in engines:
                engine.start()
            # Fork the trainer ranks before any event loop or thread pool exists in this process.
            group = RankGroup(args.tp * args.pp, setup_rank, hf_dir, args.tp, args.pp,
                              backend="nccl" if args.device == "cuda" else "gloo",
                              timeout_s=args.timeout_s)
            for engine in engines:
                engine.wait_ready()
            reports, copies = asyncio.run(bench(args, hf_dir, engines, group, memcpy))
        finally:
            if group is not None:
                group.close()
            for engine in engines:
                engine.kill()
    seconds = statistics.median(r.seconds for r in reports)
    moved = reports[0].bytes_per_engine * reports[0].engines
    gbps, copy_gbps = moved / seconds / 1e9, statistics.median(copies)
    print(f"transport={args.transport} gbps={gbps:.3f} memcpy_gbps={copy_gbps:.3f} "
          f"ratio={gbps / copy_gbps:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
