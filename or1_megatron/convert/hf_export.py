"""Writing a Hugging Face checkpoint directory out of the policy's ranks.

Both `or1 convert mcore-to-hf` and the trainer's `checkpoint.hf_every` export use these two
halves, so the two give the same bytes for the same weights:
- on the ranks, `write_stage_shards` streams the stage's full HF tensors (export.py's gathered
  stream, the one the weight sync uses) into safetensors files in a staging directory;
- on the driver, `assemble_hf_checkpoint` names the shards `model-K-of-N`, writes the index,
  config.json and the tokenizer/generation files, and renames the staging directory into place,
  so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from or1_megatron.convert.hf_config import Qwen2Arch
from or1_megatron.convert.qwen2 import Qwen2Mapping, check_names
from or1_megatron.convert.safetensors_io import INDEX_NAME
from or1_megatron.policy.checkpoint_meta import replace_directory

# Files of an HF checkpoint that are not weights but belong with them.
CARRIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
HF_SUBDIR = "hf"  # where a dist checkpoint keeps its source's carried files
DEFAULT_MAX_SHARD_GB = 5.0


def carry_hf_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy the carried (non-weight) files that `source` has into `destination`; their names."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in CARRIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def write_stage_shards(model: torch.nn.Module, mapping: Qwen2Mapping, layout: Any, staging: str | Path,
                       max_shard_bytes: int, out_dtype: torch.dtype, writer: bool,
                       progress_label: str = "") -> dict[str, Any]:
    """Collective over the stage's TP group: write this stage's HF tensors into
    `stage{pp}-part{k}.safetensors` files under `staging` (on the stage's TP rank 0, when it is
    the `writer`); returns {"files": [{file, tensors, bytes}], "written_bytes"}."""
    from safetensors.torch import save_file

    from or1_megatron.policy.export import iter_stage_hf_tensors
    from or1_megatron.progress import Progress

    files: list[dict[str, Any]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = written_bytes = 0
    total = sum(len(m.hf_names) for m in mapping.stage_entries(layout.pp_rank, layout.pp_size))
    progress = Progress(total, progress_label) if writer and progress_label else None

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"stage{layout.pp_rank:03d}-part{len(files):05d}.safetensors"
            save_file(pending, str(Path(staging) / name), metadata={"format": "pt"})
            files.append({"file": name, "tensors": list(pending), "bytes": pending_bytes})
        pending, pending_bytes = {}, 0

    for hf_name, tensor in iter_stage_hf_tensors(model, mapping, layout):
        if not writer:
            continue
        # On the host: a CUDA rank's tensors must not reach safetensors or the driver as CUDA.
        tensor = tensor.to(device="cpu", dtype=out_dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[hf_name] = tensor.clone()
        pending_bytes += nbytes
        written_bytes += nbytes
        if progress:
            progress.update(1, nbytes)
    if writer:
        flush()
    return {"files": files, "written_bytes": written_bytes}


def hf_config_json(arch: Qwen2Arch, source: Path | None, dtype: str) -> dict[str, Any]:
    """config.json for the export: the source's (all its fields kept), else one built from
    `arch`; its dtype fields say what the shards hold."""
    from or1_megatron.tiny_model import tiny_qwen2_config

    if source is not None and source.is_file():
        config = json.loads(source.read_text())
    else:
        config = tiny_qwen2_config(
            vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
            intermediate_size=arch.ffn_hidden_size, num_layers=arch.num_layers,
            num_heads=arch.num_attention_heads, num_kv_heads=arch.num_key_value_heads,
            rope_theta=arch.rope_theta, rms_norm_eps=arch.rms_norm_eps,
            max_position_embeddings=arch.max_position_embeddings,
            tie_word_embeddings=arch.tie_word_embeddings,
        ).to_dict()
    # transformers 5 reads "dtype", earlier releases "torch_dtype": keep both truthful.
    config["torch_dtype"] = config["dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    return config


def assemble_hf_checkpoint(files: list[dict[str, Any]], staging: Path, out: Path, arch: Qwen2Arch,
                           mapping: Qwen2Mapping, carried: Path | None, dtype: str,
                           where: str) -> dict[str, int]:
    """Turn the ranks' shard files in `staging` into a complete HF checkpoint and rename it to
    `out` (an existing `out` is replaced only once the new one is complete). `carried`: the
    directory whose config.json and tokenizer files go with the weights. Returns counts."""
    check_names([t for f in files for t in f["tensors"]], mapping.hf_names(),
                where=f"tensors exported from {where}")
    total = len(files)
    weight_map, total_bytes = {}, 0
    for k, info in enumerate(sorted(files, key=lambda f: f["file"]), start=1):
        final = f"model-{k:05d}-of-{total:05d}.safetensors"
        shutil.move(str(staging / info["file"]), str(staging / final))
        weight_map.update({t: final for t in info["tensors"]})
        total_bytes += info["bytes"]
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config = hf_config_json(arch, carried / "config.json" if carried else None, dtype)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if carried is not None:
        for name in CARRIED_FILES:
            if name != "config.json" and (carried / name).is_file():
                shutil.copy2(carried / name, staging / name)
    replace_directory(staging, out)
    return {"shards": total, "tensors": len(weight_map), "bytes": total_bytes}
