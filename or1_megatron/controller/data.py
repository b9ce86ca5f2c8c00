"""The run's problems and base model: loaded from files with the offline filters, or, for the
CPU demo, generated (the arithmetic task, a tokenizer trained on it, a tiny Qwen2 from scratch).

Owns what `or1 train` reads before any process starts: training and held-out problems after
the prompt-length and offline filters (every drop counted and logged), and where the base model
lives. A demo's base model is built once per run directory and reused on resume.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from or1_megatron.config.schema import OR1Config
from or1_megatron.data import arithmetic
from or1_megatron.data.filters import training_filters
from or1_megatron.data.records import DataError, ProblemRecord
from or1_megatron.eval.sampling import load_records

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train: list[ProblemRecord]
    heldout: list[ProblemRecord]
    reference_response: Optional[Callable[[ProblemRecord], str]] = None


def base_model_path(config: OR1Config, run_dir: Path) -> str:
    """The model directory the run starts from (built here for a tiny-model run)."""
    if not config.tiny_model.enabled:
        return config.model.hf_path
    out = run_dir / "base_model"
    if not (out / "model.safetensors").is_file():
        _build_tiny_base_model(config, out)
    return str(out)


def _build_tiny_base_model(config: OR1Config, out: Path) -> None:
    from transformers import AutoTokenizer

    from or1_megatron.data.tokenizer import build_tokenizer
    from or1_megatron.tiny_model import make_tiny_qwen2

    t = config.tiny_model
    partial = out.with_name(out.name + ".building")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = build_tokenizer(partial, arithmetic.tokenizer_corpus(config.data.arithmetic),
                                vocab_size=t.tokenizer_vocab_size,
                                model_max_length=t.max_position_embeddings)
    shape = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                 num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                 max_position_embeddings=t.max_position_embeddings)
    vocab = len(tokenizer)
    make_tiny_qwen2(partial, seed=config.run.seed, init_std=None, vocab_size=vocab, **shape)
    # Beside a Qwen2 config.json, AutoTokenizer loads Qwen2's class, which adds <|endoftext|>:
    # the embedding must cover every id the loaded tokenizer can produce.
    loaded = len(AutoTokenizer.from_pretrained(str(partial)))
    if loaded > vocab:
        make_tiny_qwen2(partial, seed=config.run.seed, init_std=None, vocab_size=loaded, **shape)
    partial.rename(out)
    log.info("built the tiny base model (vocabulary %d) in %s", max(loaded, vocab), out)


def load_training_data(config: OR1Config, tokenizer: Any) -> TrainingData:
    d = config.data
    if d.arithmetic.enabled:
        train, heldout = arithmetic.arithmetic_problems(d.arithmetic)
        return TrainingData(train, heldout, arithmetic.reference_response)
    if not d.train_files:
        raise DataError("<config>", None, "data.train_files is empty and data.arithmetic is off")
    train, _ = training_filters(
        load_records(d.train_files, d.format, d.on_error), model=d.offline_filter_model,
        pass_rates=d.offline_filter_pass_rates, tokenizer=tokenizer,
        max_prompt_length=config.batch.max_prompt_length)
    heldout = load_records(d.eval_files, d.format, d.on_error) if d.eval_files else []
    if d.eval_max_problems:
        heldout = heldout[:d.eval_max_problems]
    if not train:
        raise DataError(", ".join(d.train_files), None, "no training problems left after the filters")
    return TrainingData(train, heldout)
