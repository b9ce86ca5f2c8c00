"""GPU facts and efficiency factors the planner turns FLOPs and bytes into seconds with.

Owns numbers only: datasheet peaks of each supported GPU and the node it usually sits in, and
the fractions of those peaks a real run reaches. Both are printed with every plan, so an
estimate can be checked and re-run with measured factors (`--efficiency name=value`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

MIB = 1024**2


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int         # what the driver reports as total memory
    bf16_tflops: float        # dense bf16 tensor-core peak
    hbm_gbps: float           # HBM bandwidth, GB/s
    nvlink_gbps: float        # NVLink bandwidth per GPU per direction, GB/s
    ib_gbps: float            # inter-node bandwidth per GPU per direction (one NIC per GPU), GB/s
    gpus_per_node: int = 8


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        # SXM5 80 GB: nvidia-smi reports 81559 MiB; NVLink4 900 GB/s both ways; 8x NDR 400 Gb/s.
        GPU("h100-80gb", 81559 * MIB, 989.4, 3350.0, 450.0, 50.0),
        # The export variant the OR1 report trained on: NVLink cut to 400 GB/s both ways.
        GPU("h800-80gb", 81559 * MIB, 989.4, 3350.0, 200.0, 50.0),
        GPU("h200-141gb", 143771 * MIB, 989.4, 4800.0, 450.0, 50.0),
        # SXM4 80 GB: NVLink3 600 GB/s both ways; 8x HDR 200 Gb/s.
        GPU("a100-80gb", 81920 * MIB, 312.0, 2039.0, 300.0, 25.0),
    )
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak a real step reaches, and fixed costs; every one is printed."""

    train_mfu: float = 0.35         # forward+backward of packed variable-length micro-batches
    forward_mfu: float = 0.40       # old-policy log-probabilities (forward only)
    prefill_mfu: float = 0.50       # SGLang prefill of the prompts
    decode_hbm: float = 0.60        # fraction of HBM bandwidth a decode step reaches
    nvlink: float = 0.70            # fraction of NVLink bandwidth collectives reach
    ib: float = 0.70                # fraction of inter-node bandwidth collectives reach
    decode_step_latency_us: float = 10.0   # per TP collective of a decode step (two per layer)
    overhead_gib: float = 4.0       # CUDA context, NCCL buffers, allocator fragmentation per GPU
    disk_gbps: float = 2.0          # shared-filesystem bandwidth for sync.transport=disk
    sync_fixed_s: float = 1.0       # per sync: pause, begin/end update, cache flush, verify probe

    def with_overrides(self, items: list[str]) -> "Efficiency":
        """`name=value` pairs (the planner's --efficiency) applied to these factors."""
        known = {f.name for f in fields(self)}
        values = {}
        for item in items:
            name, sep, raw = item.partition("=")
            if not sep or name not in known:
                raise ValueError(f"--efficiency {item!r}: expected name=value with name one of "
                                 f"{', '.join(sorted(known))}")
            try:
                values[name] = float(raw)
            except ValueError:
                raise ValueError(f"--efficiency {item!r}: {raw!r} is not a number") from None
            if values[name] < 0:
                raise ValueError(f"--efficiency {item!r}: must be >= 0")
        return replace(self, **values)

    def rows(self) -> list[tuple[str, float]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]
