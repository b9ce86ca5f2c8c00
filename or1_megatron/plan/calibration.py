"""Policy training figures measured on real GPUs, which the planner's step times use.

Each entry is one run of `tools/bench_policy.py` (its RESULT line) with its date and commit.
`measured_train_mfu` gives the planner the MFU
measured on its GPU (the largest model measured there: MFU grows with model size, so a larger
plan is estimated conservatively); for a GPU with no entry the planner keeps the assumption in
`plan.hardware.Efficiency` and says so. New entries come from GPU runs of
`scripts/gpu_checks.sh`; the note of the issue that ran them quotes the RESULT lines.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    gpu: str                  # a plan.hardware.GPUS name
    model: str                # a configs/models name
    params: int
    micro_batch_tokens: int
    micro_batches: int
    recompute: str
    mfu: float                # 3 x forward FLOPs / step time / measured bf16 matmul peak
    tokens_per_s: float
    peak_gib: float           # torch.cuda.max_memory_allocated
    date: str
    commit: str
    note: str = ""

    def describe(self) -> str:
        text = (f"{self.model} on {self.gpu}, {self.micro_batches} x {self.micro_batch_tokens} tokens, "
                f"recompute {self.recompute}: MFU {self.mfu:.3f}, {self.tokens_per_s:,.0f} tokens/s, "
                f"peak {self.peak_gib:.0f} GiB ({self.date}, {self.commit})")
        return text + (f"; {self.note}" if self.note else "")


MEASURED: tuple[Measurement, ...] = (
    # The first GPU run (../shared/gpu/README.md), before the vocabulary-chunked kernel, the fused
    # norms/SwiGLU and per-token RoPE; SDPA's math kernel then kept [heads, L, L] scores, which is
    # most of these peaks. Lower bounds for the current code until bench_policy runs again.
    Measurement("h200-141gb", "qwen2.5-0.5b", 494_032_768, 2048, 16, "none", 0.072, 22_100, 74.0,
                "2026-12-04", "a9b3831", "GPU path patched by hand, before issue 19"),
    Measurement("h200-141gb", "qwen2.5-1.5b", 1_543_714_304, 2048, 8, "none", 0.131, 13_200, 117.0,
                "2026-12-04", "a9b3831", "GPU path patched by hand, before issue 19"),
)


def measured_train_mfu(gpu: str, measured: tuple[Measurement, ...] = MEASURED) -> Measurement | None:
    """The measurement the planner takes train_mfu from on `gpu`, or None."""
    on_gpu = [m for m in measured if m.gpu == gpu]
    return max(on_gpu, key=lambda m: m.params) if on_gpu else None
