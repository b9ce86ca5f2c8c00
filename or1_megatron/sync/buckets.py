"""Packs a stream of tensor groups (an HF tensor, or the HF tensors of one Megatron parameter)
into flat byte buckets of a bounded size.

A bucket is a preallocated uint8 buffer (in shared memory on CPU, so a colocated engine maps
it without a copy; on the GPU for CUDA IPC) plus SGLang's `FlattenedTensorMetadata` for each
tensor in it. A group's tensors are written straight into a buffer as the group arrives (at
TP > 1 the gathered shards are assembled in place, no full tensor is built first), so a
sending rank holds its own shards, one parameter's gathered shards and its buffers. The sender
uses two buffers of half the configured bucket size in turn: one is being sent while the other
is packed, and together they never exceed the configured size. Tensors the sender passes by
reference (views of the trainer's parameters, colocated on CPU) skip the copy and ride along as
views. This module owns the byte layout only; it never sends anything.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

# One alignment rule for every flattened bucket (see serialization.ALIGN).
from or1_megatron.rollout.serialization import ALIGN, _metadata_class, aligned


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class Bucket:
    """A filled bucket: `flat` (uint8, only the used bytes) and one metadata entry per tensor
    copied into it, plus `views`: tensors passed by reference instead (see `iter_buckets`)."""

    flat: torch.Tensor
    metadata: list
    views: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (without alignment padding), views included."""
        return (sum(m.end_idx - m.start_idx for m in self.metadata)
                + sum(nbytes(t) for _, t in self.views))

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views of the tensors inside the bucket (no copy)."""
        return [(m.name, self.flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
                for m in self.metadata]

    def payload(self) -> dict:
        """SGLang's `load_format="flattened_bucket"` object."""
        return {"flattened_tensor": self.flat, "metadata": list(self.metadata)}


class BucketBuffer:
    """A reusable flat buffer of `capacity` bytes that `iter_buckets` fills."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu", shared: bool = True):
        if capacity < ALIGN:
            raise ValueError(f"bucket capacity {capacity} bytes is too small")
        self.capacity = capacity
        self.device = torch.device(device)
        self.shared = shared
        self.buffer = self.allocate(capacity)
        self._spare: torch.Tensor | None = None

    def spare(self, size: int) -> torch.Tensor:
        """A second, kept buffer for a tensor larger than the bucket (an embedding): allocating
        shared memory afresh for it on every sync would cost more than copying it."""
        if self._spare is None or self._spare.numel() < size:
            self._spare = None
            self._spare = self.allocate(size)
        return self._spare[:size]

    def allocate(self, size: int) -> torch.Tensor:
        flat = torch.empty(size, dtype=torch.uint8, device=self.device)
        if self.shared and self.device.type == "cpu":
            flat.share_memory_()  # serialising it later then passes a file name, not a copy
        return flat


class TensorGroup(Protocol):
    """Tensors that are made together (the HF tensors of one Megatron parameter): their names,
    shapes and dtype up front, then written straight into the bucket, or passed by reference
    when they exist already as views (`views()`, None if not)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    def views(self) -> list[torch.Tensor] | None: ...

    def write_into(self, outs: list[torch.Tensor]) -> None: ...


@dataclass
class NamedTensor:
    """A TensorGroup of one tensor that exists already."""

    name: str
    tensor: torch.Tensor

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return (tuple(self.tensor.shape),)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def views(self) -> list[torch.Tensor]:
        return [self.tensor]

    def write_into(self, outs: list[torch.Tensor]) -> None:
        outs[0].copy_(self.tensor.detach())


def named_groups(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[NamedTensor]:
    return (NamedTensor(name, tensor) for name, tensor in named_tensors)


def iter_buckets(stream: Iterable[TensorGroup], buffers: Sequence[BucketBuffer],
                 by_reference: Callable[[torch.Tensor], bool] | None = None) -> Iterator[Bucket]:
    """Write groups in order into the buffers, yield a Bucket whenever the next one does not fit.

    Buckets fill the buffers in turn. With two buffers the consumer may still be sending the
    previous bucket while the next one is packed; it must be done with a bucket before the
    bucket after next is asked for. A group's tensors share a bucket; a group larger than a
    buffer goes alone into a buffer of its own size (the buffer's spare), in that buffer's turn.
    Groups whose views all pass `by_reference` are not copied: they gather in views-only
    buckets, which take no buffer and go as soon as a quarter of a buffer's worth has gathered,
    so the engine copies them while the packer still fills the buffer.
    """
    metadata_cls = _metadata_class()
    turn = itertools.cycle(buffers)
    buffer = next(turn)
    metadata: list = []
    views: list[tuple[str, torch.Tensor]] = []
    offset = viewed = 0
    for group in stream:
        sizes = [math.prod(shape) * group.dtype.itemsize for shape in group.shapes]
        shared = group.views() if by_reference is not None else None
        if shared is not None and all(by_reference(t) for t in shared):
            views += [(name, t.detach()) for name, t in zip(group.names, shared)]
            viewed += sum(sizes)
            if viewed >= buffer.capacity // 4:
                yield Bucket(buffer.buffer[:0], [], views)
                views, viewed = [], 0
            continue
        start, need = aligned(offset), _span(sizes)
        if metadata and start + need > buffer.capacity:
            yield Bucket(buffer.buffer[:offset], metadata)
            buffer = next(turn)
            metadata, offset, start = [], 0, 0
        if need > buffer.capacity:  # an embedding larger than the bucket: send it alone
            own = buffer.spare(need)
            yield Bucket(own, _write(own, 0, group, sizes, metadata_cls))
            buffer = next(turn)  # it took this buffer's turn
            continue
        written = _write(buffer.buffer, start, group, sizes, metadata_cls)
        metadata += written
        offset = written[-1].end_idx
    if metadata or views:
        yield Bucket(buffer.buffer[:offset], metadata, views)


def _span(sizes: list[int]) -> int:
    """Bytes the tensors take in a bucket from an aligned start, each of them aligned."""
    end = 0
    for size in sizes:
        end = aligned(end) + size
    return end


def _write(flat: torch.Tensor, start: int, group: TensorGroup, sizes: list[int],
           metadata_cls: type) -> list:
    """Write the group at `start` of `flat`; its metadata entries."""
    metadata, outs, at = [], [], start
    for name, shape, size in zip(group.names, group.shapes, sizes):
        at = aligned(at)
        metadata.append(metadata_cls(name=name, shape=torch.Size(shape), dtype=group.dtype,
                                     start_idx=at, end_idx=at + size, numel=size))
        outs.append(flat[at:at + size].view(group.dtype).view(shape))
        at += size
    group.write_into(outs)
    return metadata
