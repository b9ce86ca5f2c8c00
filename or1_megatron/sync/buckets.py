"""Packs a stream of (HF name, tensor) into flat byte buckets of a bounded size.

A bucket is a preallocated uint8 buffer (in shared memory on CPU, so a colocated engine maps
it without a copy; on the GPU for CUDA IPC) plus SGLang's `FlattenedTensorMetadata` for each
tensor in it. Each tensor of the stream is copied into a buffer as soon as it arrives and then
dropped, so a sending rank holds its own shards, one gathered parameter and its buffers. The
sender uses two buffers of half the configured bucket size in turn: one is being sent while
the other is packed, and together they never exceed the configured size. Tensors the sender
passes by reference (views of the trainer's parameters, colocated on CPU) skip the copy and
ride along as views. This module owns the byte layout only; it never sends anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import itertools
from typing import Callable, Iterable, Iterator, Sequence

import torch

from or1_megatron.rollout.serialization import _metadata_class

# Every tensor starts on a 16-byte boundary, so a receiver can view its bytes as any dtype
# without a copy (SGLang reads start_idx/end_idx, so the padding is invisible to it).
ALIGN = 16


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


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


def iter_buckets(stream: Iterable[tuple[str, torch.Tensor]], buffers: Sequence[BucketBuffer],
                 by_reference: Callable[[torch.Tensor], bool] | None = None) -> Iterator[Bucket]:
    """Copy tensors in order into the buffers, yield a Bucket whenever the next one does not fit.

    Buckets fill the buffers in turn. With two buffers the consumer may still be sending the
    previous bucket while the next one is packed; it must be done with a bucket before the
    bucket after next is asked for. A tensor larger than a buffer goes alone into a buffer of
    its own size (the buffer's spare), in that buffer's turn. Tensors for which `by_reference`
    is true are not copied: they join the bucket's `views` and count towards its size as if
    they were in the buffer, so buckets keep their size and order.
    """
    metadata_cls = _metadata_class()
    turn = itertools.cycle(buffers)
    buffer = next(turn)
    metadata: list = []
    views: list[tuple[str, torch.Tensor]] = []
    offset = viewed = 0
    for name, tensor in stream:
        size = nbytes(tensor)
        start = aligned(offset)
        if (metadata or views) and start + viewed + size > buffer.capacity:
            yield Bucket(buffer.buffer[:offset], metadata, views)
            buffer = next(turn)
            metadata, views, offset, viewed, start = [], [], 0, 0, 0
        if by_reference is not None and by_reference(tensor):
            views.append((name, tensor.detach()))
            viewed += size
            continue
        if size > buffer.capacity:  # an embedding larger than the bucket: send it alone
            own = buffer.spare(size)
            _copy_in(own, 0, tensor)
            yield Bucket(own, [metadata_cls(name=name, shape=tensor.shape, dtype=tensor.dtype,
                                            start_idx=0, end_idx=size, numel=size)])
            buffer = next(turn)  # it took this buffer's turn
            continue
        _copy_in(buffer.buffer, start, tensor)
        metadata.append(metadata_cls(name=name, shape=tensor.shape, dtype=tensor.dtype,
                                     start_idx=start, end_idx=start + size, numel=size))
        offset = start + size
    if metadata or views:
        yield Bucket(buffer.buffer[:offset], metadata, views)


def _copy_in(flat: torch.Tensor, start: int, tensor: torch.Tensor) -> None:
    size = nbytes(tensor)
    target = flat[start:start + size].view(tensor.dtype).view(tensor.shape)
    target.copy_(tensor.detach())
