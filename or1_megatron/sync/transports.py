"""The three ways a bucket reaches the engines, one class each behind one small interface.

Sender side (runs on the trainer rank that owns a pipeline stage's gathered tensors):
`open()`, `send(bucket)` for every bucket in order, `close()`; engines that became unreachable
are collected in `failed` (url -> reason) and skipped for the rest of the push, so the other
engines still get every tensor and the stream keeps draining (the TP peers are sending it shards).
An engine that answers with a refusal is a bug and raises WeightSyncError naming it.
Engine side (runs in the coordinator once every sender is done): `prepare(plan)` before the
push and `commit(client, plan)` after it.

- colocated: the bucket buffer lives in shared memory (CUDA memory on GPUs), so the payload of
  `update_weights_from_tensor(load_format="flattened_bucket")` is a file name (an IPC handle);
  views of the trainer's parameters (TP1 on CPU) go as a named-tensor payload, uncopied;
- distributed: `init_weights_update_group` with every engine (the sender is group rank 0, one
  group per pipeline stage, stages in turn), one `update_weights_from_distributed` call per
  bucket, one broadcast per tensor; gloo on CPU, NCCL between GPUs;
- disk: one safetensors file per bucket, written straight from the bucket's bytes; the engines
  load the version directory with `update_weights_from_disk` at commit.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import struct
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import torch

from or1_megatron.rollout.engine import EngineError, EngineUnavailable, HttpEngine
from or1_megatron.rollout.launcher import free_port
from or1_megatron.rollout.serialization import SharedPayload
from or1_megatron.rollout.weight_group import WeightUpdateGroup
from or1_megatron.sync.buckets import Bucket
from or1_megatron.sync.plan import EngineTarget, PushPlan, WeightSyncError


class Transport:
    """Base: the engine clients of a push and the bookkeeping of engines that failed."""

    name = ""
    # True if pipeline stages must send one after the other (see DistributedTransport).
    stages_in_turn = False
    # True if buckets may carry tensors by reference (Bucket.views) instead of copied bytes.
    passes_views = False

    def __init__(self, plan: PushPlan, pp_stage: int, device: torch.device = torch.device("cpu")):
        self.plan, self.pp_stage = plan, pp_stage
        self.device = device  # where the buckets live (the sender's parameters)
        self.clients = {t.url: HttpEngine(t.url, tp_size=t.tp_size, timeout_s=plan.timeout_s)
                        for t in plan.targets}
        self.targets = {t.url: t for t in plan.targets}
        self.failed: dict[str, str] = {}

    @property
    def live(self) -> list[str]:
        return [url for url in self.clients if url not in self.failed]

    async def open(self) -> None:
        pass

    async def send(self, bucket: Bucket) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()

    async def _on_each(self, call: Callable[[HttpEngine, EngineTarget], Awaitable[object]],
                       what: str) -> None:
        """Run `call` on every live engine at once; unreachable ones join `failed`."""
        urls = self.live
        results = await asyncio.gather(*(call(self.clients[u], self.targets[u]) for u in urls),
                                       return_exceptions=True)
        for url, result in zip(urls, results):
            if isinstance(result, EngineUnavailable):
                self.failed[url] = f"{what}: {result}"
            elif isinstance(result, EngineError):
                raise WeightSyncError(f"engine {self.targets[url].index} ({url}) refused {what} "
                                      f"from pipeline stage {self.pp_stage}: {result.message}")
            elif isinstance(result, BaseException):
                raise result

    # -- engine side (coordinator) --------------------------------------------------------

    @staticmethod
    def prepare(plan: PushPlan, hf_config_dir: str | None) -> None:
        pass

    @staticmethod
    async def commit(client: HttpEngine, plan: PushPlan) -> None:
        pass


def _names(bucket: Bucket) -> str:
    names = [m.name for m in bucket.metadata] + [name for name, _ in bucket.views]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


class ColocatedTransport(Transport):
    """Tensors copied into the bucket go as one flattened bucket; tensors passed by reference
    (`Bucket.views`: the trainer's own parameters at TP1 on CPU) as a named-tensor payload of
    views, which the engine copies straight from the trainer's memory."""

    name = "colocated"
    passes_views = True

    async def send(self, bucket: Bucket) -> None:
        async def push(client: HttpEngine, target: EngineTarget) -> None:
            if bucket.metadata:
                await client.update_weights_from_tensor(
                    SharedPayload.of_flattened(bucket.payload(), copies=target.tp_size),
                    weight_version=self.plan.version, flush_cache=False)
            if bucket.views:
                await client.update_weights_from_tensor(
                    SharedPayload.of_views(bucket.views, copies=target.tp_size),
                    weight_version=self.plan.version, flush_cache=False)
        await self._on_each(push, f"bucket [{_names(bucket)}]")


class DistributedTransport(Transport):
    """An engine runs one command at a time, and a broadcast needs every member of its group:
    two stages' groups used at once would deadlock (engine A inside stage 0's broadcast waits
    for B, which is inside stage 1's). So stages send in turn, each with its own group."""

    name = "distributed"
    stages_in_turn = True

    def __init__(self, plan: PushPlan, pp_stage: int, device: torch.device = torch.device("cpu")):
        super().__init__(plan, pp_stage, device)
        # Unique per push: an engine that missed a destroy must not refuse the next group.
        self.group_name = f"{plan.group_prefix}_v{plan.version}_pp{pp_stage}_{uuid.uuid4().hex[:8]}"
        self.group: WeightUpdateGroup | None = None
        self.members: list[str] = []

    async def open(self) -> None:
        # The buckets live where the trainer's parameters do (sender.py): NCCL between GPUs.
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        # A dead member would stall the rendezvous until the timeout: leave out the engines
        # that do not answer /health now.
        healthy = await asyncio.gather(*(self.clients[u].health() for u in self.live))
        for url, ok in zip(self.live, healthy):
            if not ok:
                self.failed[url] = "not answering /health before the weight-update group"
        port, self.members = free_port(), self.live
        if not self.members:
            return
        # Each engine TP rank joins at rank_offset + tp_rank (SGLang), after the sender at 0.
        offsets, world = {}, 1
        for url in self.members:
            offsets[url], world = world, world + self.targets[url].tp_size
        joins = [asyncio.create_task(self.clients[url].init_weights_update_group(
            self.plan.master_address, port, offsets[url], world, group_name=self.group_name,
            backend=backend)) for url in self.members]
        try:
            self.group = await asyncio.to_thread(
                WeightUpdateGroup, self.plan.master_address, port, rank=0, world_size=world,
                group_name=self.group_name, timeout_s=self.plan.timeout_s, backend=backend)
        except Exception as exc:  # an engine never joined: nobody in this group gets weights
            for url in self.members:
                self.failed.setdefault(url, f"joining weight-update group {self.group_name}: {exc}")
        results = await asyncio.gather(*joins, return_exceptions=True)
        for url, result in zip(self.members, results):
            if isinstance(result, BaseException):
                self.failed.setdefault(url, f"init_weights_update_group: {result}")
        if self.group is not None and any(url in self.failed for url in self.members):
            # A broadcast needs every member: a group with a dead member is unusable.
            for url in self.members:
                self.failed.setdefault(url, f"group {self.group_name} lost a member")

    async def send(self, bucket: Bucket) -> None:
        if self.group is None or not self.live:
            return
        names = [m.name for m in bucket.metadata]
        dtypes = [str(m.dtype).removeprefix("torch.") for m in bucket.metadata]
        shapes = [list(m.shape) for m in bucket.metadata]
        updates = asyncio.create_task(self._on_each(
            lambda client, _t: client.update_weights_from_distributed(
                names, dtypes, shapes, group_name=self.group_name,
                weight_version=self.plan.version, flush_cache=False),
            f"bucket [{_names(bucket)}]"))
        try:
            await asyncio.to_thread(self._broadcast, bucket)
        except Exception as exc:  # a member died mid-broadcast: the group is gone for everyone
            for url in self.members:
                self.failed.setdefault(url, f"broadcast in {self.group_name}: {exc}")
            self.group = None
        await updates

    def _broadcast(self, bucket: Bucket) -> None:
        for _, tensor in bucket.named_tensors():
            self.group.send(tensor)

    async def close(self) -> None:
        if self.group is not None:
            await self._on_each(lambda client, _t: client.destroy_weights_update_group(
                self.group_name), "destroy_weights_update_group")
            self.group.close()
        await super().close()


# safetensors dtype codes
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(bucket: Bucket, path: Path) -> None:
    """Write the bucket as a safetensors file straight from its bytes (no per-tensor copies).

    The format forbids holes between tensors, so offsets are recomputed without the bucket's
    alignment padding."""
    header, offset = {}, 0
    for m in bucket.metadata:
        size = m.end_idx - m.start_idx
        header[m.name] = {"dtype": _ST_DTYPES[m.dtype], "shape": list(m.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    flat = bucket.flat.cpu()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for m in bucket.metadata:
            f.write(memoryview(flat[m.start_idx:m.end_idx].numpy()))
    tmp.rename(path)  # engines never see a half-written file


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, plan: PushPlan, pp_stage: int, device: torch.device = torch.device("cpu")):
        super().__init__(plan, pp_stage, device)
        self.count = 0

    async def send(self, bucket: Bucket) -> None:
        path = Path(self.plan.disk_dir) / f"pp{self.pp_stage}-{self.count:05d}.safetensors"
        await asyncio.to_thread(write_safetensors, bucket, path)
        self.count += 1

    @staticmethod
    def prepare(plan: PushPlan, hf_config_dir: str | None) -> None:
        directory = Path(plan.disk_dir)
        if directory.exists():
            shutil.rmtree(directory)  # a failed earlier attempt at this version
        directory.mkdir(parents=True)
        if hf_config_dir:  # SGLang's loader reads the model directory, config included
            source = Path(hf_config_dir)
            source = source / "config.json" if source.is_dir() else source
            shutil.copy(source, directory / "config.json")

    @staticmethod
    async def commit(client: HttpEngine, plan: PushPlan) -> None:
        await client.update_weights_from_disk(plan.disk_dir, weight_version=plan.version)


TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t for t in (ColocatedTransport, DistributedTransport, DiskTransport)}


def transport_class(name: str) -> type[Transport]:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise WeightSyncError(f"unknown sync.transport {name!r}; one of {sorted(TRANSPORTS)}") from None
