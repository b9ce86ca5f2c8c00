"""The one Qwen2 mapping between Hugging Face tensors and Megatron-core TP shards.

Both the offline converter (tools/convert_checkpoint.py) and the online weight sync use this
module; there is no second copy of the layout rules. Megatron fuses q/k/v per query group
(`[q heads of group g; k_g; v_g]` for each group) and gate/up per TP shard (`[gate_r; up_r]`),
pads the vocabulary rows, and splits column-parallel tensors along dim 0 and row-parallel ones
along dim 1. Names here use megatron's local-spec module names with GLOBAL layer indices;
`canonical_mcore_name` translates transformer-engine names and stage-local layer indices.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch

from or1_megatron.convert.hf_config import Qwen2Arch
from or1_megatron.errors import CheckpointError

# How a tensor is laid out across the TP group.
REPLICATED = "replicated"   # norms: every rank holds all of it
ROW = "row"                 # row-parallel linear: split along the input dim (1)
VOCAB = "vocab"             # embedding / output layer: padded rows, split along dim 0
QKV = "qkv"                 # fused q/k/v, split by query group along dim 0
GATE_UP = "gate_up"         # fused gate/up, each split along dim 0 then concatenated per rank

# transformer-engine fuses the norms into the following linear; their checkpoint keys match
# megatron's local spec through these names.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorMapping:
    """One Megatron parameter and the Hugging Face tensor(s) it is made of."""

    mcore_name: str
    hf_names: tuple[str, ...]
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    layer: int | None = None  # global layer index, None for embedding / final norm / output


def layer_offset(num_layers: int, pp_rank: int, pp_size: int) -> int:
    """Global index of the first layer of a pipeline stage (layers split evenly)."""
    return pp_rank * (num_layers // pp_size)


def canonical_mcore_name(name: str, layer_offset_: int = 0) -> str:
    """Map a model's parameter name (TE or local spec, stage-local layer index) to the mapping's."""
    name = name.removeprefix("module.")
    match = _LAYER_RE.match(name)
    if not match:
        return name
    local, rest = int(match.group(1)), match.group(2)
    rest = _TE_ALIASES.get(rest, rest)
    return f"decoder.layers.{local + layer_offset_}.{rest}"


def stage_local_name(mcore_name: str, layer_offset_: int) -> str:
    match = _LAYER_RE.match(mcore_name)
    if not match:
        return mcore_name
    return f"decoder.layers.{int(match.group(1)) - layer_offset_}.{match.group(2)}"


class Qwen2Mapping:
    """Every tensor of a Qwen2 model, with the rules to shard HF tensors and to gather them back."""

    def __init__(self, arch: Qwen2Arch, padded_vocab_size: int):
        if padded_vocab_size < arch.vocab_size:
            raise ValueError(f"padded_vocab_size={padded_vocab_size} < vocab_size={arch.vocab_size}")
        self.arch = arch
        self.padded_vocab_size = padded_vocab_size
        self._entries = self._build()
        self._by_mcore = {m.mcore_name: m for m in self._entries}

    def _build(self) -> list[TensorMapping]:
        a = self.arch
        h, d = a.hidden_size, a.head_dim
        q_rows, kv_rows = a.num_attention_heads * d, a.num_key_value_heads * d
        entries = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                                 VOCAB, ((a.vocab_size, h),))]
        for i in range(a.num_layers):
            hf = f"model.layers.{i}."
            mc = f"decoder.layers.{i}."
            entries += [
                TensorMapping(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",),
                              REPLICATED, ((h,),), i),
                TensorMapping(mc + "self_attention.linear_qkv.weight",
                              tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"),
                              QKV, ((q_rows, h), (kv_rows, h), (kv_rows, h)), i),
                TensorMapping(mc + "self_attention.linear_qkv.bias",
                              tuple(hf + f"self_attn.{p}_proj.bias" for p in "qkv"),
                              QKV, ((q_rows,), (kv_rows,), (kv_rows,)), i),
                TensorMapping(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",),
                              ROW, ((h, q_rows),), i),
                TensorMapping(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",),
                              REPLICATED, ((h,),), i),
                TensorMapping(mc + "mlp.linear_fc1.weight",
                              (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                              GATE_UP, ((a.ffn_hidden_size, h), (a.ffn_hidden_size, h)), i),
                TensorMapping(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",),
                              ROW, ((h, a.ffn_hidden_size),), i),
            ]
        entries.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",),
                                     REPLICATED, ((h,),)))
        if not a.tie_word_embeddings:
            entries.append(TensorMapping("output_layer.weight", ("lm_head.weight",), VOCAB,
                                         ((a.vocab_size, h),)))
        return entries

    # -- lookup -----------------------------------------------------------------------------

    def entries(self) -> list[TensorMapping]:
        return list(self._entries)

    def hf_names(self) -> list[str]:
        return [name for m in self._entries for name in m.hf_names]

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s for m in self._entries for n, s in zip(m.hf_names, m.hf_shapes)}

    def get(self, mcore_name: str) -> TensorMapping:
        try:
            return self._by_mcore[mcore_name]
        except KeyError:
            raise CheckpointError(f"no Qwen2 mapping for Megatron tensor {mcore_name!r}") from None

    def stage_entries(self, pp_rank: int, pp_size: int) -> list[TensorMapping]:
        """The tensors a pipeline stage owns (embedding on the first, norm/output on the last)."""
        first = layer_offset(self.arch.num_layers, pp_rank, pp_size)
        last = layer_offset(self.arch.num_layers, pp_rank + 1, pp_size)
        out = []
        for m in self._entries:
            if m.layer is not None:
                keep = first <= m.layer < last
            elif m.mcore_name.startswith("embedding."):
                keep = pp_rank == 0
            else:
                keep = pp_rank == pp_size - 1
            if keep:
                out.append(m)
        return out

    # -- shapes -----------------------------------------------------------------------------

    def mcore_shard_shape(self, m: TensorMapping, tp_size: int) -> tuple[int, ...]:
        if m.kind == REPLICATED:
            return m.hf_shapes[0]
        if m.kind == ROW:
            rows, cols = m.hf_shapes[0]
            return (rows, cols // tp_size)
        if m.kind == VOCAB:
            return (self.padded_vocab_size // tp_size, m.hf_shapes[0][1])
        fused_rows = sum(shape[0] for shape in m.hf_shapes) // tp_size
        return (fused_rows, *m.hf_shapes[0][1:])

    # -- HF -> Megatron -----------------------------------------------------------------------

    def to_mcore_shard(self, m: TensorMapping, hf: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        """Build TP rank `tp_rank`'s shard of `m` from its full HF tensors."""
        for name, tensor, shape in zip(m.hf_names, hf, m.hf_shapes):
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {shape}")
        if m.kind == REPLICATED:
            return hf[0]
        if m.kind == ROW:
            return hf[0].chunk(tp_size, dim=1)[tp_rank]
        if m.kind == VOCAB:
            full = hf[0]
            pad = self.padded_vocab_size - full.shape[0]
            if pad:
                full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
            return full.chunk(tp_size, dim=0)[tp_rank]
        if m.kind == GATE_UP:
            gate, up = (t.chunk(tp_size, dim=0)[tp_rank] for t in hf)
            return torch.cat([gate, up])
        return self._fuse_qkv(*hf).chunk(tp_size, dim=0)[tp_rank]

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.arch
        groups, d = a.num_key_value_heads, a.head_dim
        tail = q.shape[1:]
        per_group = [
            q.reshape(groups, (a.num_attention_heads // groups) * d, *tail),
            k.reshape(groups, d, *tail),
            v.reshape(groups, d, *tail),
        ]
        return torch.cat(per_group, dim=1).reshape(-1, *tail)

    # -- Megatron -> HF -----------------------------------------------------------------------

    def to_hf(self, m: TensorMapping, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gathered TP shards (in TP rank order) of `m` -> its full HF tensors.

        From a single shard (TP1) these are views of it where the layout allows (all but q/k/v):
        the weight sync passes such views to a colocated engine by reference."""
        views = self.hf_views(m, shards)
        if views is not None:
            return views
        outs = [shards[0].new_empty(shape) for shape in m.hf_shapes]
        self._write_hf(m, shards, outs)
        return outs

    def hf_views(self, m: TensorMapping, shards: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """`m`'s full HF tensors as views of its shard, where they are that (one shard, not
        q/k/v, whose heads interleave per query group); else None."""
        self._check_shards(m, shards)
        if len(shards) != 1 or m.kind == QKV:
            return None
        if m.kind == VOCAB:
            return [shards[0][: self.arch.vocab_size]]
        if m.kind == GATE_UP:
            return list(shards[0].chunk(2, dim=0))
        return [shards[0]]

    def to_hf_into(self, m: TensorMapping, shards: list[torch.Tensor],
                   outs: list[torch.Tensor]) -> None:
        """Write `m`'s full HF tensors from its gathered TP shards into `outs` (say, views into a
        weight-sync bucket): gathering and packing in one pass, no full tensor built first."""
        self._check_shards(m, shards)
        for name, out, shape in zip(m.hf_names, outs, m.hf_shapes, strict=True):
            if tuple(out.shape) != shape:
                raise CheckpointError(f"{name}: output of shape {tuple(out.shape)}, expected {shape}")
        self._write_hf(m, shards, outs)

    def _check_shards(self, m: TensorMapping, shards: list[torch.Tensor]) -> None:
        expected = self.mcore_shard_shape(m, len(shards))
        for r, shard in enumerate(shards):
            if tuple(shard.shape) != expected:
                raise CheckpointError(
                    f"{m.mcore_name} (TP rank {r} of {len(shards)}): shape {tuple(shard.shape)}, "
                    f"expected {expected}"
                )

    def _write_hf(self, m: TensorMapping, shards: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        if m.kind == REPLICATED:
            outs[0].copy_(shards[0])
        elif m.kind == ROW:
            torch.cat(shards, dim=1, out=outs[0])
        elif m.kind == VOCAB:
            row = 0
            for shard in shards:  # the padding rows are the last ones: drop them
                take = min(shard.shape[0], self.arch.vocab_size - row)
                if take <= 0:
                    break
                outs[0][row:row + take].copy_(shard[:take])
                row += take
        elif m.kind == GATE_UP:
            halves = [s.chunk(2, dim=0) for s in shards]
            torch.cat([gate for gate, _ in halves], out=outs[0])
            torch.cat([up for _, up in halves], out=outs[1])
        else:  # QKV: every shard holds whole query groups, each [q heads; k; v]
            a = self.arch
            groups, d = a.num_key_value_heads, a.head_dim
            q_per_group = (a.num_attention_heads // groups) * d
            per_shard = groups // len(shards)
            tail = shards[0].shape[1:]
            grouped = [out.view(groups, -1, *tail) for out in outs]
            for r, shard in enumerate(shards):
                parts = shard.reshape(per_shard, q_per_group + 2 * d, *tail).split(
                    [q_per_group, d, d], dim=1)
                for out, part in zip(grouped, parts):
                    out[r * per_shard:(r + 1) * per_shard].copy_(part)


def check_names(
    found: Iterable[str], expected: Iterable[str], where: str, what: str = "tensor"
) -> None:
    """Raise CheckpointError naming every missing and unexpected tensor (nothing is dropped)."""
    counts = Counter(list(found))
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    found_set, expected_set = set(counts), set(expected)
    missing = sorted(expected_set - found_set)
    extra = sorted(found_set - expected_set)
    problems = []
    if missing:
        problems.append(f"missing {what}s: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"unexpected {what}s: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
    if duplicates:
        problems.append(f"{what}s present more than once: {', '.join(duplicates[:10])}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
