"""The rollout engine interface (SGLang's own calls) and its HTTP client, `HttpEngine`.

One client drives both engines the trainer uses, because they serve the same HTTP API: an SGLang
server on GPUs (`sglang_adapter.py` starts it) and the CPU engine (`or1 serve`). This module owns
the wire calls and their errors: a refused call raises `EngineError` with the engine's message,
an unreachable or dead engine raises `EngineUnavailable` (what the router retries on). It never
starts processes and never chooses between engines.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import aiohttp
import torch

from or1_megatron.errors import OR1Error
from or1_megatron.rollout.protocol import DEFAULT_GROUP_NAME
from or1_megatron.rollout.serialization import SharedPayload


class EngineError(OR1Error):
    """The engine answered and refused the call (bad request, no session, bad payload, ...)."""

    def __init__(self, url: str, endpoint: str, status: int, message: str):
        super().__init__(f"{url}{endpoint} answered {status}: {message}")
        self.url, self.endpoint, self.status, self.message = url, endpoint, status, message


class EngineUnavailable(OR1Error):
    """The engine could not be reached or died before answering."""


@dataclass
class GenerateResult:
    """One generated sample, read from SGLang's `/generate` answer."""

    rid: str
    output_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: str  # "length" | "stop" | "abort"
    weight_version: str | None
    raw: dict

    @classmethod
    def from_sglang(cls, item: dict) -> "GenerateResult":
        meta = item["meta_info"]
        logprobs = meta.get("output_token_logprobs")
        return cls(
            rid=meta["id"],
            output_ids=list(item["output_ids"]),
            output_logprobs=None if logprobs is None else [float(lp) for lp, *_ in logprobs],
            finish_reason=meta["finish_reason"]["type"],
            weight_version=meta.get("weight_version"),
            raw=item,
        )


class RolloutEngine(Protocol):
    """What the trainer needs from an engine: SGLang's calls, async."""

    url: str

    async def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict | list[dict],
                       *, return_logprob: bool = True,
                       rid: list[str] | None = None) -> list[GenerateResult]: ...
    async def begin_weight_update(self) -> str: ...
    async def end_weight_update(self) -> str: ...
    async def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], *,
                                         load_format: str | None = "flattened_bucket",
                                         weight_version: str | None = None,
                                         flush_cache: bool = True,
                                         abort_all_requests: bool = False) -> str: ...
    async def init_weights_update_group(self, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, *,
                                        group_name: str = DEFAULT_GROUP_NAME,
                                        backend: str = "nccl") -> str: ...
    async def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], *,
                                              group_name: str = DEFAULT_GROUP_NAME,
                                              weight_version: str | None = None,
                                              flush_cache: bool = True) -> str: ...
    async def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> str: ...
    async def update_weights_from_disk(self, model_path: str, *,
                                       weight_version: str | None = None) -> str: ...
    async def flush_cache(self) -> None: ...
    async def pause_generation(self, mode: str = "abort") -> None: ...
    async def continue_generation(self) -> None: ...
    async def release_memory_occupation(self, tags: list[str] | None = None) -> None: ...
    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None: ...
    async def health(self) -> bool: ...
    async def model_info(self) -> dict: ...
    async def weight_version(self) -> str: ...
    async def close(self) -> None: ...


class HttpEngine:
    """`RolloutEngine` over SGLang's HTTP API. `tp_size` payload copies go with tensor updates.

    Connections are unlimited (aiohttp's default pool of 100 would cap the requests an engine
    sees, and queueing for a connection would eat into their timeouts), and health checks use a
    session of their own, so a busy engine is never mistaken for a dead one.
    """

    def __init__(self, url: str, *, tp_size: int = 1, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.tp_size = tp_size
        self.timeout_s = timeout_s
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, purpose: str) -> aiohttp.ClientSession:
        session = self._sessions.get(purpose)
        if session is None or session.closed:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._sessions[purpose] = session
        return session

    async def _request(self, method: str, endpoint: str, body: Any = None, *,
                       timeout_s: float | None = None) -> Any:
        session = self._session("health" if endpoint == "/health" else "work")
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with session.request(method, self.url + endpoint, json=body,
                                       timeout=timeout) as response:
                text = await response.text()
                status = response.status
                is_json = response.content_type == "application/json"
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                asyncio.TimeoutError) as exc:
            raise EngineUnavailable(f"{self.url}{endpoint}: {type(exc).__name__}: {exc}") from exc
        data = _json(text) if is_json else text
        if status >= 400:
            raise EngineError(self.url, endpoint, status, _message(data))
        return data

    async def generate_raw(self, body: dict) -> Any:
        """POST /generate with an SGLang GenerateReqInput body; the JSON answer as is."""
        return await self._request("POST", "/generate", body)

    async def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: dict | list[dict],
                       *, return_logprob: bool = True,
                       rid: list[str] | None = None) -> list[GenerateResult]:
        body: dict[str, Any] = {"input_ids": [list(p) for p in input_ids],
                                "sampling_params": sampling_params,
                                "return_logprob": return_logprob}
        if rid is not None:
            body["rid"] = rid
        answer = await self.generate_raw(body)
        return [GenerateResult.from_sglang(item) for item in answer]

    async def _success(self, endpoint: str, body: dict | None = None,
                       timeout_s: float | None = None) -> str:
        answer = await self._request("POST", endpoint, body or {}, timeout_s=timeout_s)
        return answer.get("message", "") if isinstance(answer, dict) else str(answer)

    async def begin_weight_update(self) -> str:
        return await self._success("/begin_weight_update")

    async def end_weight_update(self) -> str:
        return await self._success("/end_weight_update")

    async def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]]
                                         | SharedPayload, *,
                                         load_format: str | None = "flattened_bucket",
                                         weight_version: str | None = None,
                                         flush_cache: bool = True,
                                         abort_all_requests: bool = False) -> str:
        """Send tensors, or a ready SharedPayload (with `tp_size` copies), which this releases."""
        payload = (named_tensors if isinstance(named_tensors, SharedPayload)
                   else SharedPayload(named_tensors, load_format, copies=self.tp_size))
        load_format = payload.load_format
        body = {"serialized_named_tensors": payload.texts, "load_format": load_format,
                "flush_cache": flush_cache, "abort_all_requests": abort_all_requests,
                "weight_version": weight_version}
        # Only a success consumed the payload: a refused one (SGLang and the CPU engine refuse
        # before decoding, or hand the references back) or an unreachable engine leaves the
        # receiver's references here, and keeping them would leak the /dev/shm files.
        delivered = False
        try:
            message = await self._success("/update_weights_from_tensor", body)
            delivered = True
            return message
        finally:
            payload.release(delivered)

    async def init_weights_update_group(self, master_address: str, master_port: int,
                                        rank_offset: int, world_size: int, *,
                                        group_name: str = DEFAULT_GROUP_NAME,
                                        backend: str = "nccl") -> str:
        return await self._success("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend})

    async def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], *,
                                              group_name: str = DEFAULT_GROUP_NAME,
                                              weight_version: str | None = None,
                                              flush_cache: bool = True) -> str:
        return await self._success("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "weight_version": weight_version, "flush_cache": flush_cache})

    async def destroy_weights_update_group(self, group_name: str = DEFAULT_GROUP_NAME) -> str:
        return await self._success("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_disk(self, model_path: str, *,
                                       weight_version: str | None = None) -> str:
        return await self._success("/update_weights_from_disk",
                                   {"model_path": model_path, "weight_version": weight_version})

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache")

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._request("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self._request("POST", "/continue_generation", {})

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._request("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._request("POST", "/resume_memory_occupation", {"tags": tags})

    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            await self._request("GET", "/health", timeout_s=timeout_s)
        except (EngineError, EngineUnavailable):
            return False
        return True

    async def model_info(self) -> dict:
        return await self._request("GET", "/model_info")

    async def load(self) -> dict:
        """GET /v1/loads, first DP rank: `num_running_reqs` (decoding), `num_waiting_reqs`
        (queued) and, depending on the engine, more of SGLang's load fields."""
        return (await self._request("GET", "/v1/loads"))["loads"][0]

    async def weight_version(self) -> str:
        return (await self.model_info())["weight_version"]

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _message(data: Any) -> str:
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict):
            return str(data["error"].get("message", data))
        if "message" in data:
            return str(data["message"])
    return str(data).strip()
