"""Rollout engines placed by Ray: one host actor per engine starts its server on its node.

The engine server (`or1 serve` on CPU, SGLang on GPUs) runs as a process of the node the run's
placement group gives it; a small `_EngineHost` actor owns the process there, and the driver
sees a `RayEngineProcess`: the launcher's EngineProcess interface (start, wait_ready, alive,
kill, restart, log_tail, url) forwarded to the host, so the router and the weight-sync
coordinator restart a crashed engine wherever it lives. Which bundles and GPUs each engine gets
is placement.py's decision.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from or1_megatron.config.schema import OR1Config
from or1_megatron.controller.placement import GPU_BACKENDS, Placement, bundle_gpu_ids
from or1_megatron.rollout.launcher import EngineProcess


def resolved_backend(config: OR1Config) -> str:
    if config.rollout.backend != "auto":
        return config.rollout.backend
    import torch

    return "sglang" if torch.cuda.is_available() else "cpu"


class _EngineHost:
    """Owns one engine server process on this actor's node.

    A GPU engine sees exactly `visible_gpus` (the GPUs of its bundles; by default the ones Ray
    gave this actor) and addresses them from index 0."""

    def __init__(self, backend: str, model_path: str, options: dict[str, Any],
                 visible_gpus: list[str] | None = None):
        host = ray.util.get_node_ip_address()
        self.visible_gpus: list[str] = []
        if backend in GPU_BACKENDS:
            self.visible_gpus = visible_gpus or [str(g) for g in ray.get_gpu_ids()]
            options = {**options, "env": {"CUDA_VISIBLE_DEVICES": ",".join(self.visible_gpus)}}
        if backend == "sglang":
            from or1_megatron.rollout.sglang_adapter import SGLangEngineProcess

            self.process: EngineProcess = SGLangEngineProcess(model_path, host=host, base_gpu_id=0,
                                                              **options)
        else:
            from or1_megatron.rollout.launcher import CpuEngineProcess

            self.process = CpuEngineProcess(model_path, host=host, **options)

    def gpu_view(self) -> dict[str, Any]:
        """What the engine process will see: its CUDA_VISIBLE_DEVICES and the GPU indices it
        uses inside that list."""
        tp = getattr(self.process, "tp_size", 1)
        base = getattr(self.process, "base_gpu_id", 0)
        return {"CUDA_VISIBLE_DEVICES": self.process.env.get("CUDA_VISIBLE_DEVICES"),
                "uses": list(range(base, base + tp)) if self.visible_gpus else []}

    def address(self) -> tuple[str, int, str]:
        return self.process.host, self.process.port, str(self.process.log_path)

    def start(self) -> None:
        self.process.start()

    def wait_ready(self, timeout_s: float | None) -> None:
        self.process.wait_ready(timeout_s)

    def alive(self) -> bool:
        return self.process.alive()

    def exit_code(self) -> int | None:
        return self.process.exit_code()

    def kill(self, sig: int, timeout_s: float) -> None:
        self.process.kill(sig, timeout_s)

    def restart(self) -> None:
        self.process.restart()

    def log_tail(self, lines: int) -> str:
        return self.process.log_tail(lines)


class RayEngineProcess(EngineProcess):
    """An engine process owned by an `_EngineHost` actor, driven from the driver."""

    def __init__(self, host_actor: Any, *, tp_size: int = 1, start_timeout_s: float = 300.0,
                 call_timeout_s: float = 60.0):
        addr, port, log_path = ray.get(host_actor.address.remote(), timeout=call_timeout_s)
        super().__init__(host=addr, port=port, log_dir=Path(log_path).parent,
                         start_timeout_s=start_timeout_s)
        self.host_actor = host_actor
        self.tp_size = tp_size
        self.call_timeout_s = call_timeout_s

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        return ray.get(getattr(self.host_actor, method).remote(*args),
                       timeout=timeout_s or self.call_timeout_s)

    @property
    def pid(self) -> int | None:
        return None

    def start(self) -> None:
        self._call("start")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        wait = timeout_s or self.start_timeout_s
        self._call("wait_ready", wait, timeout_s=wait + 30)

    def alive(self) -> bool:
        return bool(self._call("alive"))

    def exit_code(self) -> int | None:
        return self._call("exit_code")

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> None:
        self._call("kill", sig, timeout_s, timeout_s=2 * timeout_s + 30)

    def restart(self) -> None:
        self._call("restart", timeout_s=120)
        self.restarts += 1

    def log_tail(self, lines: int = 30) -> str:
        return str(self._call("log_tail", lines))


def engine_options(config: OR1Config, backend: str, index: int, colocated: bool) -> dict[str, Any]:
    """The engine process's options (its server's command line) for engine `index`."""
    r = config.rollout
    if backend == "sglang":
        return {"tp_size": r.engine_tp, "random_seed": config.run.seed + index,
                "mem_fraction_static": r.mem_fraction, "extra_args": list(r.extra_args),
                "enable_memory_saver": colocated}
    options: dict[str, Any] = {"random_seed": config.run.seed + index,
                               "num_threads": r.engine_threads, "extra_args": list(r.extra_args)}
    if backend == "torch":  # `or1 serve` on the GPU, in the policy's dtype
        options["device"] = "cuda"
        options["dtype"] = "bfloat16" if config.model.dtype == "bf16" else "float32"
    return options


def start_engines(config: OR1Config, model_path: str, placement_group: Any, placement: Placement,
                  log_dir: str, start: bool = True) -> list[RayEngineProcess]:
    """Create the engines' host actors in their bundles and start the servers (not yet ready)."""
    r, backend = config.rollout, resolved_backend(config)
    colocated = r.placement == "colocated"
    engines = []
    for slot in placement.engines:
        # Colocated GPU engines span several policy bundles: find the GPU of each.
        visible = (bundle_gpu_ids(placement_group, slot.bundles)
                   if placement.gpu_engines and colocated else None)
        options = engine_options(config, backend, slot.index, colocated)
        host = ray.remote(_EngineHost).options(
            num_cpus=0, num_gpus=slot.host_gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=slot.bundles[0]),
        ).remote(backend, model_path, {**options, "log_dir": log_dir,
                                       "start_timeout_s": r.start_timeout_s}, visible)
        engine = RayEngineProcess(host, tp_size=r.engine_tp, start_timeout_s=r.start_timeout_s)
        if start:
            engine.start()
        engines.append(engine)
    return engines
