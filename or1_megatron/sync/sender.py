"""The trainer-rank side of a push: which ranks take part, which one sends, and the send loop.

All TP ranks of a stage's first data-parallel replica take part: TP rank 0 gets the other TP
ranks' shards of each parameter (sent point to point, or mapped from their shared memory on
CPU: shared_params.py), packs the full tensors into buckets and hands them to the transport, so
each pipeline stage sends its own layers once. The other data-parallel replicas hold the same
weights and do nothing. The senders of all stages form one of megatron's pipeline groups (TP
rank 0, DP rank 0), which orders them when the transport needs it. A colocated engine on CPU
reads views of the parameters instead of copies at TP1. This module never talks to the
coordinator: it gets a PushPlan and returns a PushReport.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from megatron.core import parallel_state

from or1_megatron.policy.export import iter_stage_parameters
from or1_megatron.policy.parallel import RankLayout
from or1_megatron.rollout.shm import remove_stale_shm_files
from or1_megatron.sync.buckets import ALIGN, BucketBuffer, TensorGroup, iter_buckets
from or1_megatron.sync.plan import PushPlan, PushReport
from or1_megatron.sync.shared_params import PeerShards, PeerShardsUnavailable, share_parameters
from or1_megatron.sync.transports import transport_class

if TYPE_CHECKING:
    from or1_megatron.policy.worker import PolicyWorker

log = logging.getLogger(__name__)


def sends(layout: RankLayout) -> bool:
    """The rank that sends its pipeline stage's tensors."""
    return layout.tp_rank == 0 and layout.dp_rank == 0


class WeightSender:
    """One per trainer rank. Keeps its bucket buffer between pushes (a shared-memory or GPU
    buffer is costly to allocate and to register each time)."""

    def __init__(self) -> None:
        self._buffers: list[BucketBuffer] = []
        self._peer_shards = PeerShards()
        self._peers_usable: bool | None = None

    def buffers(self, bucket_bytes: int, device: torch.device) -> list[BucketBuffer]:
        """Two buffers of half the bucket size on `device` (where the trainer's parameters
        are): one in flight while the other is packed."""
        half = max(ALIGN, bucket_bytes // 2 // ALIGN * ALIGN)
        if not self._buffers or self._buffers[0].capacity != half:
            if device.type == "cpu":  # on this node, a crashed earlier run's buffers may still sit
                remove_stale_shm_files()
            self._buffers = []  # free the old ones before allocating new ones
            self._buffers = [BucketBuffer(half, device=device) for _ in range(2)]
        return self._buffers

    def push(self, worker: "PolicyWorker", plan: PushPlan) -> PushReport:
        """Collective over the stage's TP group: stream this stage's HF tensors to the engines."""
        layout = worker.layout
        report = PushReport(rank=layout.rank, pp_stage=layout.pp_rank, sent=sends(layout))
        if layout.dp_rank != 0:
            return report
        peers = self._peers_from_shared_memory(worker, plan)
        through_shm = peers is not None
        if layout.tp_size > 1:
            report.tp_shards = "shared_memory" if through_shm else "point_to_point"
        try:
            if report.sent:
                stream = iter_stage_parameters(worker.unwrapped, worker.mapping, layout, peers)
                try:
                    self._send_stage(worker, plan, stream, report)
                except BaseException:
                    if not through_shm:  # the TP peers are still sending shards: take them
                        _drain(stream)
                    raise
            elif not through_shm:  # send this rank's shards to the TP-rank-0 peer, which sends
                _drain(iter_stage_parameters(worker.unwrapped, worker.mapping, layout))
        finally:
            if through_shm:  # TP rank 0 is done with the peers' shards, even after an error
                PeerShards.done()
        return report

    def _peers_from_shared_memory(self, worker: "PolicyWorker",
                                  plan: PushPlan) -> dict[str, list[torch.Tensor]] | None:
        """Collective over the stage's TP group: the peers' shards mapped from their shared
        memory ({} on the peers), or None if they travel point to point this time."""
        layout = worker.layout
        if not (plan.share_parameters and layout.tp_size > 1):
            return None
        if self._peers_usable is None:
            self._peers_usable = PeerShards.usable(worker.unwrapped, layout)
        if not self._peers_usable:
            return None
        try:
            return self._peer_shards.exchange(worker.unwrapped, worker.mapping, layout) or {}
        except PeerShardsUnavailable as exc:  # raised on every rank of the group alike
            # The text, not the exception: a kept log record would keep its frames (and the
            # parameters they reach) alive past the rank's end, and their files in /dev/shm.
            log.warning("TP shards travel point to point from now on: %s", str(exc))
            self._peers_usable = False
            return None

    def _send_stage(self, worker: "PolicyWorker", plan: PushPlan,
                    stream: Iterable[TensorGroup], report: PushReport) -> None:
        layout = worker.layout
        start = time.perf_counter()
        # Senders whose transport cannot interleave stages go one stage after the other: the
        # k-th barrier of the senders' pipeline group opens once stages 0..k have sent.
        in_turn = transport_class(plan.transport).stages_in_turn and layout.pp_size > 1
        for _ in range(layout.pp_rank if in_turn else 0):
            torch.distributed.barrier(group=parallel_state.get_pipeline_model_parallel_group())
        by_reference = (share_parameters(worker.unwrapped)
                        if transport_class(plan.transport).passes_views and plan.share_parameters
                        else None)
        try:
            asyncio.run(self._send(stream, plan, layout.pp_rank, report, by_reference,
                                   worker.device))
        finally:
            for _ in range(layout.pp_size - layout.pp_rank if in_turn else 0):
                torch.distributed.barrier(group=parallel_state.get_pipeline_model_parallel_group())
        report.seconds = time.perf_counter() - start

    async def _send(self, stream: Iterable[TensorGroup], plan: PushPlan,
                    pp_stage: int, report: PushReport,
                    by_reference: Callable[[torch.Tensor], bool] | None,
                    device: torch.device) -> None:
        transport = transport_class(plan.transport)(plan, pp_stage, device)
        buckets = iter_buckets(stream, self.buffers(plan.bucket_bytes, device), by_reference)
        in_flight: asyncio.Task | None = None
        try:
            await asyncio.wait_for(transport.open(), plan.timeout_s)
            while True:
                # Pack the next bucket in a thread (copies and TP receives release the GIL)
                # while the event loop sends the previous one.
                bucket = await asyncio.to_thread(next, buckets, None)
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                if bucket is None:
                    break
                in_flight = asyncio.create_task(asyncio.wait_for(transport.send(bucket),
                                                                 plan.timeout_s))
                report.buckets += 1
                report.bytes += bucket.nbytes
                report.tensors += len(bucket.metadata)
        finally:
            if in_flight is not None:
                in_flight.cancel()
                await asyncio.gather(in_flight, return_exceptions=True)
            await asyncio.wait_for(transport.close(), plan.timeout_s)
        report.failed = dict(transport.failed)


def _drain(stream: Iterable[TensorGroup]) -> None:
    """Run the export stream to its end: point to point, each step is a send or receive that a
    TP peer is waiting for (a rank that stopped early would leave its peers blocked)."""
    for _ in stream:
        pass
