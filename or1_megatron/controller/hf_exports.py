"""The run's Hugging Face checkpoints (`checkpoint.hf_every`): `<run_dir>/hf/step_NNNNNNN/`.

Each is a complete HF checkpoint (safetensors shards with their index, config.json, the tokenizer
and generation files of the model the run started from) that `or1 eval`, `or1 serve` and
transformers load as it is. The ranks write the shards from the same gathered stream the weight
sync uses (convert/hf_export.py), into a hidden staging directory that is renamed into place
once complete, so a crash never leaves a half-written `step_N`; the newest `hf_keep` are kept.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from or1_megatron.config.schema import OR1Config
from or1_megatron.controller import ranks
from or1_megatron.controller.checkpoints import PREFIX, StepDirs
from or1_megatron.convert.hf_config import load_arch, padded_vocab_size
from or1_megatron.convert.hf_export import DEFAULT_MAX_SHARD_GB, assemble_hf_checkpoint
from or1_megatron.convert.qwen2 import Qwen2Mapping

log = logging.getLogger(__name__)


class HfExports(StepDirs):
    def __init__(self, run_dir: str | Path, config: OR1Config):
        super().__init__(Path(run_dir) / "hf")
        self.config = config
        # Staging directories of an export a crash interrupted are never complete: drop them.
        for leftover in self.root.glob(f".{PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, directory) of every finished export, oldest first."""
        return sorted((step, path) for step, path in self.numbered()
                      if (path / "config.json").is_file())

    def export(self, ranks_group: Any, step: int) -> Path:
        """Write the policy's current weights as `hf/step_N` (collective over the ranks)."""
        cfg = self.config
        arch = load_arch(cfg.model.hf_path)
        mapping = Qwen2Mapping(arch, padded_vocab_size(
            arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel))
        out = self.for_step(step)
        self.root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        log.info("hf export: writing the policy at step %d to %s", step, out)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{out.name}."))
        try:
            per_rank = ranks_group.call(ranks.write_hf_shards, str(staging),
                                        int(DEFAULT_MAX_SHARD_GB * 1e9))
            files = [f for result in per_rank if result for f in result["files"]]
            counts = assemble_hf_checkpoint(files, staging, out, arch, mapping, Path(cfg.model.hf_path),
                                            cfg.model.dtype, where=f"the policy at step {step}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place
        self.prune(cfg.checkpoint.hf_keep)
        log.info("hf export: %s written (%d shards, %d tensors, %.1f MB) in %.1f s", out,
                 counts["shards"], counts["tensors"], counts["bytes"] / 1e6, time.perf_counter() - start)
        return out

    def prune(self, keep: int) -> None:
        for _, path in self.complete()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
