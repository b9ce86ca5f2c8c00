"""Policy ranks as Ray actors in a placement group: the trainer side of `or1 train`.

`RayRankGroup` has the interface of the forked `RankGroup` (`call(fn, *args)` runs
`fn(state, *args)` on every rank and returns the results in rank order; `close()`), so the loop,
the weight-sync push and the tests drive either. Each actor sits in its own bundle of the run's
placement group; rank 0 picks the rendezvous address of the gloo/NCCL group on its node. Every
wait is bounded; a dead actor or a rank's exception is a `RankFailed` naming the rank.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Sequence

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from or1_megatron.distributed.cpu_results import require_cpu_tensors
from or1_megatron.distributed.fork_launcher import RankFailed
from or1_megatron.distributed.network import bind_gloo_to

log = logging.getLogger(__name__)


class _RankActor:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.state: Any = None

    def rendezvous_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int, setup: Callable[..., Any],
              args: tuple) -> tuple[int, str]:
        # Gloo on the interface of this node's address, not wherever the hostname resolves.
        bind_gloo_to(ray.util.get_node_ip_address())
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          # one device per actor: Ray sets CUDA_VISIBLE_DEVICES to it
                          LOCAL_RANK="0")
        self.state = setup(self.rank, self.world_size, *args)
        return os.getpid(), ray.util.get_node_ip_address()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(self.state, *args)
        require_cpu_tensors(result, f"rank {self.rank}'s result of {getattr(fn, '__name__', fn)}")
        return result


class RayRankGroup:
    """`world_size` actors, actor i in bundle `first_bundle + i` of `placement_group`."""

    def __init__(self, world_size: int, setup: Callable[..., Any], *args: Any,
                 placement_group: Any, first_bundle: int = 0, gpus_per_rank: float = 0.0,
                 timeout_s: float = 600.0):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.nodes: list[str] = []  # each rank's node address, once set up
        actor = ray.remote(_RankActor)
        self.actors = [
            actor.options(
                num_cpus=1, num_gpus=gpus_per_rank, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=first_bundle + rank),
            ).remote(rank, world_size)
            for rank in range(world_size)
        ]
        try:
            addr, port = self._get([self.actors[0].rendezvous_address.remote()], "rendezvous")[0]
            started = self._get([a.setup.remote(addr, port, setup, args) for a in self.actors], "setup")
            self.pids = [pid for pid, _ in started]
            self.nodes = [node for _, node in started]  # each rank's node address
            for rank, (pid, node) in enumerate(started):
                log.info("policy rank %d: pid %d on node %s", rank, pid, node)
        except BaseException:
            self.close()
            raise

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Run `fn(state, *args)` on every rank; large arguments go through Ray's object store once."""
        refs = [ray.put(a) if _large(a) else a for a in args]
        return self._get([actor.call.remote(fn, *refs) for actor in self.actors],
                         getattr(fn, "__name__", "call"), timeout_s)

    def _get(self, refs: Sequence[Any], what: str, timeout_s: float | None = None) -> list[Any]:
        """Every rank's result, in rank order. A rank that dies or raises fails the call at
        once, naming the rank and its node: the others may be blocked in a collective with it
        and would otherwise hold the call until its timeout."""
        limit = timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise RankFailed(f"{what} did not finish on every rank within {limit:.0f} s")
            done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                results[rank_of[ref]] = self._result(ref, rank_of[ref], what)
        return [results[rank] for rank in range(len(refs))]

    def _result(self, ref: Any, rank: int, what: str) -> Any:
        """The rank's result (fetched once); RankFailed naming the rank and its node."""
        where = f"policy rank {rank}" + (f" on node {self.nodes[rank]}" if rank < len(self.nodes) else "")
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise RankFailed(f"{where} died during {what} (its node or process is gone): {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            self.close()
            raise RankFailed(f"{where} failed in {what}:\n{exc}") from None

    def close(self, force: bool = False) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def share(self, value: Any) -> Any:
        """`value` in Ray's object store once, for several calls: pass what this returns."""
        return ray.put(value)

    def __enter__(self) -> "RayRankGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _large(value: Any) -> bool:
    # Object refs passed as top-level arguments are resolved by Ray on each actor (one put
    # inside another would not be).
    return not isinstance(value, (int, float, str, bool, type(None), ray.ObjectRef))
