"""Rollout engines placed by Ray: one host actor per engine starts its server on its node.

The engine server (`or1 serve` on CPU, SGLang on GPUs) runs as a process of the node the run's
placement group gives it; a small `_EngineHost` actor owns the process there, and the driver
sees a `RayEngineProcess`: the launcher's EngineProcess interface (start, wait_ready, alive,
kill, restart, log_tail, url) forwarded to the host, so the router and the weight-sync
coordinator restart a crashed engine wherever it lives. Colocated engines share the bundles of
the policy ranks (no CPUs of their own; on GPUs the same devices); disaggregated ones get
bundles of their own after the policy's.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from or1_megatron.config.schema import OR1Config
from or1_megatron.rollout.launcher import EngineProcess


def resolved_backend(config: OR1Config) -> str:
    if config.rollout.backend != "auto":
        return config.rollout.backend
    import torch

    return "sglang" if torch.cuda.is_available() else "cpu"


class _EngineHost:
    """Owns one engine server process on this actor's node."""

    def __init__(self, backend: str, model_path: str, options: dict[str, Any]):
        host = ray.util.get_node_ip_address()
        if backend == "cpu":
            from or1_megatron.rollout.launcher import CpuEngineProcess

            self.process: EngineProcess = CpuEngineProcess(model_path, host=host, **options)
        else:
            from or1_megatron.rollout.sglang_adapter import SGLangEngineProcess

            gpu_ids = ray.get_gpu_ids()
            base = int(gpu_ids[0]) if gpu_ids else 0
            self.process = SGLangEngineProcess(model_path, host=host, base_gpu_id=base, **options)

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


def engine_bundles(config: OR1Config) -> list[dict[str, float]]:
    """Bundles the engines add to the placement group (none when colocated)."""
    r = config.rollout
    if r.placement == "colocated":
        return []
    gpu = {"GPU": float(r.engine_tp)} if resolved_backend(config) == "sglang" else {}
    return [{"CPU": 1.0, **gpu} for _ in range(r.engines)]


def start_engines(config: OR1Config, model_path: str, placement_group: Any, log_dir: str
                  ) -> list[RayEngineProcess]:
    """Create the engines' host actors in their bundles and start the servers (not yet ready)."""
    r, backend = config.rollout, resolved_backend(config)
    world = config.parallel.world_size
    engines = []
    for i in range(r.engines):
        colocated = r.placement == "colocated"
        bundle = (i * r.engine_tp) % world if colocated else world + i
        if backend == "cpu":
            options: dict[str, Any] = {"random_seed": config.run.seed + i,
                                       "num_threads": r.engine_threads,
                                       "extra_args": list(r.extra_args)}
            gpus = 0.0
        else:
            options = {"tp_size": r.engine_tp, "random_seed": config.run.seed + i,
                       "mem_fraction_static": r.mem_fraction, "extra_args": list(r.extra_args),
                       "enable_memory_saver": colocated}
            # Colocated: a sliver of the bundle's GPU tells the host which device it is on.
            gpus = 0.01 if colocated else float(r.engine_tp)
        host = ray.remote(_EngineHost).options(
            num_cpus=0, num_gpus=gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle),
        ).remote(backend, model_path, {**options, "log_dir": log_dir,
                                       "start_timeout_s": r.start_timeout_s})
        engine = RayEngineProcess(host, tp_size=r.engine_tp, start_timeout_s=r.start_timeout_s)
        engine.start()
        engines.append(engine)
    return engines
