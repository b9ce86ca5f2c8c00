"""Reads a Hugging Face config.json into the architecture facts the policy is built from.

Only architectures with a mapping in this package are accepted; anything else is refused by
name, so a converter or trainer never guesses at a model it does not know.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from or1_megatron.errors import ModelConfigError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class Qwen2Arch:
    """The shape and numerics of a Qwen2 decoder (DeepSeek-R1-Distill-Qwen-7B/32B are Qwen2)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    architecture: str = "Qwen2ForCausalLM"

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_theta(raw: dict, path: str) -> float:
    # transformers 5 nests it in rope_parameters; 4.x and the released checkpoints keep it on top.
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    params = raw.get("rope_parameters") or {}
    if "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise ModelConfigError(
                f"{path}: rope_parameters.rope_type={params['rope_type']!r} is not supported "
                "(only default rotary embeddings)"
            )
        return float(params["rope_theta"])
    raise ModelConfigError(f"{path}: no rope_theta (neither top-level nor in rope_parameters)")


def arch_from_dict(raw: dict, source: str = "<dict>") -> Qwen2Arch:
    """Validate a config.json dict and return its architecture; errors name the field and source."""
    architectures = raw.get("architectures") or []
    if raw.get("model_type") == "qwen2" and not architectures:
        architectures = ["Qwen2ForCausalLM"]
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{source}: architectures={architectures!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def field_(name: str, kind=int):
        if name not in raw or raw[name] is None:
            raise ModelConfigError(f"{source}: missing field {name!r}")
        try:
            return kind(raw[name])
        except (TypeError, ValueError):
            raise ModelConfigError(f"{source}: field {name!r}={raw[name]!r} is not {kind.__name__}") from None

    hidden = field_("hidden_size")
    heads = field_("num_attention_heads")
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    if head_dim * heads != hidden:
        raise ModelConfigError(
            f"{source}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}"
        )
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    if raw.get("use_sliding_window"):
        raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (silu only)")
    return Qwen2Arch(
        vocab_size=field_("vocab_size"),
        hidden_size=hidden,
        ffn_hidden_size=field_("intermediate_size"),
        num_layers=field_("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(raw, source),
        rms_norm_eps=field_("rms_norm_eps", float),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 32768),
        architecture=architectures[0],
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Vocabulary rows of the embedding and output layer.

    Unlike Megatron-LM (multiple of divisible_by x TP), the padding does not depend on TP when TP
    divides `divisible_by`, so a checkpoint saved at TP2 loads at TP1 with the same shapes.
    """
    multiple = math.lcm(divisible_by, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def layout_problems(arch: Qwen2Arch, tensor_parallel: int, pipeline_parallel: int) -> list[tuple[str, str]]:
    """(key, reason) for each way a TP x PP layout cannot hold this architecture."""
    problems = []
    if arch.num_attention_heads % tensor_parallel:
        problems.append(("tensor_parallel", f"{tensor_parallel} does not divide "
                         f"num_attention_heads={arch.num_attention_heads}"))
    if arch.num_key_value_heads % tensor_parallel:
        problems.append(("tensor_parallel", f"{tensor_parallel} does not divide "
                         f"num_key_value_heads={arch.num_key_value_heads}"))
    if arch.num_layers % pipeline_parallel:
        problems.append(("pipeline_parallel", f"{pipeline_parallel} does not divide "
                         f"num_hidden_layers={arch.num_layers}"))
    return problems


def config_json_path(hf_path: str | Path) -> Path:
    path = Path(hf_path)
    return path / "config.json" if path.is_dir() or path.suffix != ".json" else path


def load_arch(hf_path: str | Path) -> Qwen2Arch:
    """Read `<hf_path>/config.json` (or a config.json path itself)."""
    path = config_json_path(hf_path)
    if not path.is_file():
        raise ModelConfigError(f"{path}: no such file (expected a Hugging Face config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None
    return arch_from_dict(raw, str(path))
