"""Request and response schemas of the rollout engines' HTTP API: the subset of SGLang's we use.

Field names, defaults and response shapes follow SGLang 0.5.21 (`managers/io_struct.py`,
`entrypoints/http_server.py`, `sampling/sampling_params.py`), so the same client drives an SGLang
server and our CPU engine. This module owns parsing and validation only: it never touches a model.

Deliberate differences from SGLang (stricter, never looser):
- a request field or sampling parameter that this subset does not implement is rejected with a
  400 error naming it, instead of being accepted (SGLang accepts e.g. `regex` and honours it;
  silently ignoring it here would produce rollouts that differ from SGLang's);
- `stream`, `text` stop strings and input-token logprobs are not implemented and are rejected.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from or1_megatron.errors import OR1Error

# SGLang's "no top-k" sentinel (sampling_params.TOP_K_ALL); -1 means the same there.
TOP_K_ALL = 1 << 30
# SGLang treats temperatures below this as greedy (top_k = 1, logprobs of the raw logits).
GREEDY_TEMPERATURE = 1e-6
PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
DEFAULT_GROUP_NAME = "weight_update_group"


class RequestError(OR1Error):
    """A request body is malformed: unknown field, wrong type or an unsupported value."""


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    # bool is an int in Python; reject it where a number is meant.
    if isinstance(value, bool) and bool not in types:
        raise RequestError(f"field {name!r}: expected {_names(types)}, got bool")
    if not isinstance(value, types):
        raise RequestError(f"field {name!r}: expected {_names(types)}, got {type(value).__name__}")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _build(cls: type, payload: Any, where: str) -> Any:
    """Build dataclass `cls` from a JSON object, rejecting unknown fields by name."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(payload).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise RequestError(
            f"{where}: unsupported field(s) {unknown}; this engine supports {sorted(known)}"
        )
    try:
        obj = cls(**payload)
    except TypeError as exc:  # a required field is missing
        raise RequestError(f"{where}: {exc}") from None
    obj.validate()
    return obj


class _Body:
    """A parsed request body; subclasses check their fields in `validate`."""

    def validate(self) -> None:
        pass


@dataclass
class SamplingParams(_Body):
    """The sampling parameters of one request (SGLang names and defaults)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None
    # Accepted because they only affect text output, which token-id clients do not use.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False

    def validate(self) -> None:
        _check_type("max_new_tokens", self.max_new_tokens, (int,))
        _check_type("temperature", self.temperature, (int, float))
        _check_type("top_p", self.top_p, (int, float))
        _check_type("top_k", self.top_k, (int,))
        _check_type("min_p", self.min_p, (int, float))
        _check_type("n", self.n, (int,))
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        if self.top_k < 1:
            raise RequestError(f"top_k must be >= 1 or -1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise RequestError(f"n must be >= 1, got {self.n}")
        if self.stop_token_ids is not None:
            _check_type("stop_token_ids", self.stop_token_ids, (list,))
            for token in self.stop_token_ids:
                _check_type("stop_token_ids[]", token, (int,))
        if self.sampling_seed is not None:
            _check_type("sampling_seed", self.sampling_seed, (int,))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass
class GenerateReqInput(_Body):
    """POST /generate. A single request (flat `input_ids`) or a batch (list of lists)."""

    input_ids: list[int] | list[list[int]] | None = None
    text: str | list[str] | None = None
    sampling_params: dict | list[dict] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    stream: bool = False
    log_metrics: bool = True

    def validate(self) -> None:
        if self.stream:
            raise RequestError("stream=true is not supported by this engine; use stream=false")
        if (self.input_ids is None) == (self.text is None):
            raise RequestError("exactly one of 'input_ids' and 'text' must be given")
        for name in ("logprob_start_len", "top_logprobs_num"):
            values = getattr(self, name)
            values = values if isinstance(values, list) else [values]
            if any(v not in (None, -1, 0) for v in values):
                raise RequestError(
                    f"{name} is not supported (only output-token logprobs are returned)"
                )

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)


@dataclass
class SampleRequest:
    """One normalised sample to generate: what the engine's scheduler consumes."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    return_text_in_logprobs: bool = False


def _per_item(value: Any, batch_size: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != batch_size:
            raise RequestError(f"{name}: {len(value)} entries for a batch of {batch_size}")
        return value
    return [value] * batch_size


def expand_generate_request(
    req: GenerateReqInput, prompts: list[list[int]], default_rid: str
) -> list[SampleRequest]:
    """Expand a (batched, n>1) request into samples, grouped by prompt like SGLang's output."""
    batch = len(prompts)
    params = _per_item(req.sampling_params, batch, "sampling_params")
    logprob = _per_item(req.return_logprob, batch, "return_logprob")
    rids = _per_item(req.rid, batch, "rid") if isinstance(req.rid, list) else None
    samples: list[SampleRequest] = []
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError(f"input_ids[{i}] is empty")
        for j, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int):
                raise RequestError(f"input_ids[{i}][{j}] is not an int: {token!r}")
        sp = _build(SamplingParams, params[i], f"sampling_params[{i}]")
        base = rids[i] if rids is not None else (req.rid if batch == 1 and req.rid else None)
        base = base or f"{default_rid}-{i}"
        for k in range(sp.n):
            rid = base if sp.n == 1 else f"{base}-{k}"
            seed = sp.sampling_seed
            # Parallel samples of one prompt must differ even when the request fixes a seed.
            one = dataclasses.replace(sp, n=1, sampling_seed=None if seed is None else seed + k)
            samples.append(SampleRequest(rid, list(prompt), one, bool(logprob[i]),
                                         req.return_text_in_logprobs))
    return samples


def parse_generate(payload: Any) -> GenerateReqInput:
    return _build(GenerateReqInput, payload, "generate")


@dataclass
class UpdateWeightsFromTensorReqInput(_Body):
    """POST /update_weights_from_tensor: one base64 ForkingPickler payload per engine TP rank."""

    serialized_named_tensors: list[str] = field(default_factory=list)
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    selector: str = "all"
    torch_empty_cache: bool = False
    rid: str | None = None

    def validate(self) -> None:
        _check_type("serialized_named_tensors", self.serialized_named_tensors, (list,))
        if self.load_format not in (None, "direct", "flattened_bucket"):
            raise RequestError(
                f"load_format {self.load_format!r} is not supported; "
                "use null (named tensors) or 'flattened_bucket'"
            )
        _check_selector(self.selector)


@dataclass
class UpdateWeightsFromDistributedReqInput(_Body):
    """POST /update_weights_from_distributed: tensors arrive by broadcast from group rank 0."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    selector: str = "all"
    torch_empty_cache: bool = False
    rid: str | None = None

    def validate(self) -> None:
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise RequestError(
                f"names, dtypes and shapes differ in length: "
                f"{len(self.names)}, {len(self.dtypes)}, {len(self.shapes)}"
            )
        if self.load_format is not None:
            raise RequestError(
                f"load_format {self.load_format!r} is not supported for distributed updates "
                "by this engine; send one broadcast per tensor (load_format=null)"
            )
        _check_selector(self.selector)


@dataclass
class InitWeightsUpdateGroupReqInput(_Body):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: str = "nccl"
    rid: str | None = None

    def validate(self) -> None:
        _check_type("master_port", self.master_port, (int,))
        _check_type("rank_offset", self.rank_offset, (int,))
        _check_type("world_size", self.world_size, (int,))
        if not 0 < self.rank_offset < self.world_size:
            raise RequestError(
                f"rank_offset {self.rank_offset} must be in [1, world_size={self.world_size})"
            )


@dataclass
class DestroyWeightsUpdateGroupReqInput(_Body):
    group_name: str = DEFAULT_GROUP_NAME
    rid: str | None = None


@dataclass
class UpdateWeightFromDiskReqInput(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    rid: str | None = None

    def validate(self) -> None:
        if self.load_format not in (None, "auto", "safetensors"):
            raise RequestError(f"load_format {self.load_format!r} is not supported; use safetensors")


@dataclass
class BeginWeightUpdateReqInput(_Body):
    selector: str = "all"
    rid: str | None = None

    def validate(self) -> None:
        _check_selector(self.selector)


@dataclass
class EndWeightUpdateReqInput(_Body):
    rid: str | None = None


@dataclass
class PauseGenerationReqInput(_Body):
    mode: str = "abort"
    rid: str | None = None

    def validate(self) -> None:
        if self.mode not in PAUSE_MODES:
            raise RequestError(f"mode must be one of {PAUSE_MODES}, got {self.mode!r}")


@dataclass
class ContinueGenerationReqInput(_Body):
    torch_empty_cache: bool = True
    rid: str | None = None


@dataclass
class MemoryOccupationReqInput(_Body):
    """POST /release_memory_occupation and /resume_memory_occupation."""

    tags: list[str] | None = None
    rid: str | None = None

    def validate(self) -> None:
        for tag in self.tags or []:
            if tag not in MEMORY_TAGS:
                raise RequestError(f"unknown memory tag {tag!r}; known: {MEMORY_TAGS}")

    @property
    def resolved_tags(self) -> tuple[str, ...]:
        return tuple(self.tags) if self.tags else MEMORY_TAGS


def _check_selector(selector: str) -> None:
    # A CPU engine has no draft model; "draft" would select nothing, which SGLang reports too.
    if selector not in ("all", "target"):
        raise RequestError(f"selector {selector!r} is not supported (no draft model); use 'all'")


def parse(cls: type, payload: Any) -> Any:
    """Parse the JSON body of a control request into its dataclass; RequestError on bad input."""
    return _build(cls, payload, cls.__name__)


def finish_length(length: int) -> dict:
    return {"type": "length", "length": length}


def finish_stop(token_id: int) -> dict:
    return {"type": "stop", "matched": token_id}


def finish_abort(message: str) -> dict:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def error_body(message: str) -> dict:
    """SGLang's `_create_error_response` body."""
    return {"error": {"message": message}}
