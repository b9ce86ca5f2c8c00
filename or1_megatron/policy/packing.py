"""Padding-free packing of variable-length sequences into micro-batches for the Megatron forward.

A micro-batch is one row of concatenated sequences ('thd' layout) with `cu_seqlens` marking the
boundaries; attention and rotary embeddings restart at each boundary. Micro-batches are formed
by a token budget (first-fit decreasing), so short responses share a forward pass and no token
is padded except the few that round a pack up to a multiple the parallel layout needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams


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
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token tensors aligned to targets

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def packed_seq_params(self) -> PackedSeqParams:
        max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=max_len,
            max_seqlen_kv=max_len,
        )

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
    tokens = torch.zeros(padded_total, dtype=torch.long)
    positions = torch.zeros(padded_total, dtype=torch.long)
    targets = torch.zeros(padded_total, dtype=torch.long)
    mask = torch.zeros(padded_total, dtype=torch.bool)
    packed_extras = {name: torch.zeros(padded_total, dtype=torch.float32) for name in (extras or {})}
    bounds, start = [0], 0
    for k, (seq, length) in enumerate(zip(seqs, lengths)):
        ids = torch.as_tensor(seq, dtype=torch.long)
        tokens[start : start + length] = ids
        positions[start : start + length] = torch.arange(length)
        targets[start : start + length - 1] = ids[1:]
        mask[start : start + length - 1] = True
        for name, values in (extras or {}).items():
            value = torch.as_tensor(values[indices[k]], dtype=torch.float32)
            if value.shape != (length - 1,):
                raise ValueError(
                    f"extra {name!r} of sequence {indices[k]} has shape {tuple(value.shape)}, "
                    f"expected ({length - 1},) = one value per predicted token"
                )
            packed_extras[name][start : start + length - 1] = value
        start += length
        bounds.append(start)
    if padded_total > total:
        positions[total:] = torch.arange(padded_total - total)
        bounds.append(padded_total)  # the padding is a sequence of its own: it touches nothing real
    return PackedMicroBatch(
        tokens=tokens.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        targets=targets,
        target_mask=mask,
        seq_lengths=lengths,
        indices=list(indices),
        extras=packed_extras,
    )
