"""Padding-free packing of variable-length sequences into micro-batches for the Megatron forward.

A micro-batch is one row of concatenated sequences ('thd' layout) with `cu_seqlens` marking the
boundaries; attention and rotary embeddings restart at each boundary. Micro-batches are formed
by a token budget (first-fit decreasing), so short responses share a forward pass and no token
is padded except the few that round a pack up to a multiple the parallel layout needs.
Packing happens on the host; `PackedMicroBatch.to(device)` moves a pack to the rank's device in
one go, and every length the attention needs is known on the host (no device sync per layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class HostPackedSeqParams(PackedSeqParams):
    """Megatron's packed-sequence parameters plus the boundaries on the host, so attention
    that loops over sequences needs no device sync to find them, and (set by the model for the
    local spec) the per-token rotary ``(cos, sin)`` every layer applies."""

    host_bounds: tuple[int, ...] = ()
    rotary_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class PackedMicroBatch:
    """One packed micro-batch. Position i of `targets` holds the token that position i predicts."""

    tokens: torch.Tensor          # [1, t] int64
    position_ids: torch.Tensor    # [1, t] int64, restarting at 0 for every sequence
    cu_seqlens: torch.Tensor      # [n + 1] int32 (+1 entry when a padding segment closes the pack)
    targets: torch.Tensor         # [t] int64, 0 where nothing is predicted
    target_mask: torch.Tensor     # [t] bool, True where `targets` is a real next token
    seq_lengths: list[int]        # lengths of the real sequences, in pack order
    indices: list[int]            # positions of those sequences in the caller's list
    max_seqlen: int               # the longest segment (sequence or padding), known on the host
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token tensors aligned to targets

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    host_bounds: tuple[int, ...] = ()  # cu_seqlens as Python ints

    @property
    def packed_seq_params(self) -> PackedSeqParams:
        return HostPackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
            host_bounds=self.host_bounds,
        )

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        """This pack with every tensor on `device` (copied from pinned memory on GPUs)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True)

        return replace(self, tokens=move(self.tokens), position_ids=move(self.position_ids),
                       cu_seqlens=move(self.cu_seqlens), targets=move(self.targets),
                       target_mask=move(self.target_mask),
                       extras={name: move(t) for name, t in self.extras.items()})

    def split_per_sequence(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """Cut a [t] per-position tensor into one [L - 1] tensor per sequence (its predictions)."""
        out, start = [], 0
        for length in self.seq_lengths:
            out.append(per_token[start : start + length - 1])
            start += length
        return out


def plan_micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `max_tokens` tokens each.

    First-fit decreasing: deterministic for the same lengths, so every rank of a model-parallel
    group (which all receive the same sequences) forms identical micro-batches.
    """
    for i, length in enumerate(lengths):
        if length > max_tokens:
            raise ValueError(
                f"sequence {i} has {length} tokens, more than the micro-batch budget "
                f"batch.micro_batch_tokens={max_tokens}"
            )
        if length < 2:
            raise ValueError(f"sequence {i} has {length} token(s); at least 2 are needed to predict one")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def pack(
    sequences: list[list[int]],
    indices: list[int],
    pad_to_multiple: int = 1,
    extras: dict[str, list[torch.Tensor]] | None = None,
) -> PackedMicroBatch:
    """Pack `sequences[i] for i in indices` into one micro-batch.

    `extras` maps a name to per-sequence tensors of length L - 1 (one value per predicted token,
    e.g. old log-probs or advantages); they are laid out aligned with `targets`, zero elsewhere.
    """
    seqs = [sequences[i] for i in indices]
    lengths = [len(s) for s in seqs]
    total = sum(lengths)
    padded_total = -(-total // pad_to_multiple) * pad_to_multiple
    host = torch.device("cpu")
    tokens = torch.zeros(padded_total, dtype=torch.long, device=host)
    positions = torch.zeros(padded_total, dtype=torch.long, device=host)
    targets = torch.zeros(padded_total, dtype=torch.long, device=host)
    mask = torch.zeros(padded_total, dtype=torch.bool, device=host)
    packed_extras = {name: torch.zeros(padded_total, dtype=torch.float32, device=host)
                     for name in (extras or {})}
    bounds, start = [0], 0
    for k, (seq, length) in enumerate(zip(seqs, lengths)):
        ids = torch.as_tensor(seq, dtype=torch.long, device=host)
        tokens[start : start + length] = ids
        positions[start : start + length] = torch.arange(length, device=host)
        targets[start : start + length - 1] = ids[1:]
        mask[start : start + length - 1] = True
        for name, values in (extras or {}).items():
            value = torch.as_tensor(values[indices[k]], dtype=torch.float32, device=host)
            if value.shape != (length - 1,):
                raise ValueError(
                    f"extra {name!r} of sequence {indices[k]} has shape {tuple(value.shape)}, "
                    f"expected ({length - 1},) = one value per predicted token"
                )
            packed_extras[name][start : start + length - 1] = value
        start += length
        bounds.append(start)
    if padded_total > total:
        positions[total:] = torch.arange(padded_total - total, device=host)
        bounds.append(padded_total)  # the padding is a sequence of its own: it touches nothing real
    return PackedMicroBatch(
        tokens=tokens.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=host),
        targets=targets,
        target_mask=mask,
        seq_lengths=lengths,
        indices=list(indices),
        max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
        host_bounds=tuple(bounds),
        extras=packed_extras,
    )
