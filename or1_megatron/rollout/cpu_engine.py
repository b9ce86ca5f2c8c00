"""The CPU rollout engine: a `transformers` causal LM behind SGLang's scheduling semantics.

It owns the model, one scheduler thread that runs every forward pass and every control command
(so a weight update can never race a decode step), batched prefill + KV-cached decode of waves
of requests, per-request seeded sampling, and SGLang's control semantics: the begin/end weight
update session (SGLang >= 0.5.21), pause modes abort|retract|in_place, memory release/resume,
weight versions (per-request `weight_versions` spans like SGLang's). It never speaks HTTP
(server.py does) and never decides where requests go (router.py does).

Batching: waiting requests are taken in waves of up to `max_running_requests`, left-padded and
prefilled together, then decoded one token per step; finished rows leave the batch and the KV
cache. Requests that arrive during a wave wait for the next one (no continuous batching).
Logprobs are those of SGLang's default: log-softmax of logits / temperature, before top-k/top-p
filtering; greedy requests (temperature 0) report log-softmax of the raw logits.

Weight updates wait until the running wave finishes, as SGLang's wait for in-flight requests,
unless generation is paused in place or the update asks `abort_all_requests`. Differences from
SGLang (documented, deliberate): an unknown parameter name, a wrong shape or an undecodable
payload is answered with an error and nothing is loaded (SGLang ignores unknown names and dies
on a wrong shape); memory release keeps requests queued until resume. Like SGLang, a tensor
update outside a session is refused before its payload is decoded; a payload refused after
decoding hands its shared-memory references back, so a refusal always leaves them to the sender.
"""
from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from or1_megatron.errors import OR1Error
from or1_megatron.rollout import protocol
from or1_megatron.rollout.protocol import SampleRequest
from or1_megatron.rollout.serialization import KeptMappings, PayloadError, decode_payload
from or1_megatron.rollout.shm import remove_stale_shm_files
from or1_megatron.rollout.weight_group import WeightUpdateGroup

log = logging.getLogger(__name__)


class EngineCommandError(OR1Error):
    """A control command was refused: the message is what the HTTP caller sees."""


@dataclass
class _Seq:
    """One sample in flight: its request, what it generated so far and how it ended."""

    req: SampleRequest
    generator: torch.Generator
    on_done: Callable[["_Seq"], None]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[list] = field(default_factory=list)  # [version, start, end] per weight version
    finish: dict | None = None
    retractions: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> list[int]:
        return self.req.input_ids + self.output_ids


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: concurrent.futures.Future
    during_wave: bool  # may run between decode steps (pause, or an update that aborts all)


class CpuEngine:
    """A real generation engine on CPU with SGLang's control surface; thread-safe entry points."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        random_seed: int = 0,
        max_running_requests: int = 64,
        weight_version: str = "default",
        served_model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoModelForCausalLM

        self.model_path = str(model_path)
        self.served_model_name = served_model_name or self.model_path
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).eval()
        self.model.to(self.device)
        self.model.requires_grad_(False)
        self.tokenizer = _load_tokenizer(self.model_path)
        self.weight_version = weight_version
        self.max_running_requests = max_running_requests
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.eos_ids = _eos_ids(self.model)
        self.pad_id = 0
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this one takes.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._params = dict(self.model.state_dict(keep_vars=True))
        self._shapes = {name: (p.shape, p.dtype) for name, p in self._params.items()}
        self._rng = random.Random(random_seed)
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._deferred: list[_Command] = []
        self._lock = threading.Lock()  # guards _waiting between the HTTP and scheduler threads
        self._wake = threading.Event()
        self._paused: str | None = None
        self._session_open = False
        self._mappings = KeptMappings()  # the sender's reused payload files, kept mapped
        self._released: set[str] = set()
        self._groups: dict[str, WeightUpdateGroup] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cpu-engine-scheduler", daemon=True)

    # ------------------------------------------------------------ entry points (any thread)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, samples: list[SampleRequest]) -> concurrent.futures.Future:
        """Queue samples; the future resolves to their SGLang-shaped results, in order."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        released = sorted(self._released & {"weights", "kv_cache"})
        if released:  # on a GPU this memory now belongs to the trainer: generating would crash
            raise protocol.RequestError(
                f"cannot generate while {' and '.join(released)} "
                f"{'is' if len(released) == 1 else 'are'} released; call "
                "resume_memory_occupation first")
        for sample in samples:
            if len(sample.input_ids) >= self.context_len:
                raise protocol.RequestError(
                    f"request {sample.rid}: {len(sample.input_ids)} input tokens reach the "
                    f"context length {self.context_len}")
            if max(sample.input_ids) >= self.model.config.vocab_size or min(sample.input_ids) < 0:
                raise protocol.RequestError(
                    f"request {sample.rid}: a token id is outside [0, {self.model.config.vocab_size})")
        results: list[dict | None] = [None] * len(samples)
        remaining = [len(samples)]

        def done(index: int, seq: _Seq) -> None:
            results[index] = self._result(seq)
            remaining[0] -= 1
            if remaining[0] == 0 and not future.done():
                future.set_result(results)

        seqs = []
        for i, sample in enumerate(samples):
            seed = sample.params.sampling_seed
            with self._lock:
                seed = self._rng.randrange(1 << 62) if seed is None else seed
            generator = torch.Generator(device=self.device).manual_seed(seed)
            seqs.append(_Seq(sample, generator, lambda s, i=i: done(i, s)))
        if not seqs:
            future.set_result([])
            return future
        with self._lock:
            self._waiting.extend(seqs)
        self._wake.set()
        return future

    def call(self, fn: Callable[[], Any], *, during_wave: bool = False) -> concurrent.futures.Future:
        """Run `fn` on the scheduler thread (between decode steps if `during_wave`)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Command(fn, future, during_wave))
        self._wake.set()
        return future

    # ------------------------------------------------------------ control commands
    # Each runs on the scheduler thread through `call`; raising EngineCommandError refuses it.

    def begin_weight_update(self) -> str:
        if self._session_open:
            raise EngineCommandError("a weight update session is already open; "
                                     "call end_weight_update first")
        self._session_open = True
        return "Weight update session opened."

    def end_weight_update(self) -> str:
        if not self._session_open:
            raise EngineCommandError("no weight update session is open; call begin_weight_update first")
        self._session_open = False
        if self._mappings.end_session():  # perhaps the files of a trainer that was killed
            remove_stale_shm_files()
        return "Weight update session closed."

    def update_weights_from_tensor(self, req: protocol.UpdateWeightsFromTensorReqInput) -> str:
        # The session first, as SGLang: a payload refused before decoding stays the sender's.
        self._check_session("update_weights_from_tensor")
        decoded = []
        try:
            for text in req.serialized_named_tensors:
                decoded.append(decode_payload(text, req.load_format))
            if len(decoded) != 1:
                raise EngineCommandError(f"got {len(decoded)} serialized payloads; this engine "
                                         "has tp_size 1 and takes one")
            answer = self._apply(decoded[0].named, req.weight_version, req.abort_all_requests)
            self._mappings.used(decoded[0])
            return answer
        except Exception as exc:
            error = str(exc) if isinstance(exc, (EngineCommandError, PayloadError)) \
                else f"{type(exc).__name__}: {exc}"
        # Any answer but success tells the sender to drop its references: hand them back. The
        # error is raised out here, and no local keeps a payload: the answer's future keeps
        # this frame, which would keep the payload mapped after the sender let go of it.
        while decoded:
            decoded.pop().refuse()
        raise EngineCommandError(error)

    def update_weights_from_disk(self, req: protocol.UpdateWeightFromDiskReqInput) -> str:
        self._check_session("update_weights_from_disk")
        return self._apply(_read_safetensors(req.model_path), req.weight_version,
                           req.abort_all_requests)

    def init_weights_update_group(self, req: protocol.InitWeightsUpdateGroupReqInput) -> str:
        if req.group_name in self._groups:
            raise EngineCommandError(f"weight update group {req.group_name!r} already exists")
        usable = ("gloo", "nccl") if self.device.type == "cuda" else ("gloo",)
        if req.backend not in usable:
            raise EngineCommandError(f"backend {req.backend!r} needs a GPU engine; this engine "
                                     f"runs on {self.device} and uses {' or '.join(usable)}")
        self._groups[req.group_name] = WeightUpdateGroup(
            req.master_address, req.master_port, rank=req.rank_offset,
            world_size=req.world_size, group_name=req.group_name, backend=req.backend)
        return f"Joined weight update group {req.group_name!r} as rank {req.rank_offset}."

    def update_weights_from_distributed(self, req: protocol.UpdateWeightsFromDistributedReqInput) -> str:
        group = self._groups.get(req.group_name)
        if group is None:
            raise EngineCommandError(f"no weight update group {req.group_name!r}; "
                                     "call init_weights_update_group first")
        self._check_session("update_weights_from_distributed")
        try:
            dtypes = [_dtype(name) for name in req.dtypes]
        except ValueError as exc:
            raise EngineCommandError(str(exc)) from None
        # Receive everything (the sender broadcasts regardless), then validate and load.
        named = [(name, group.receive(shape, dtype))
                 for name, dtype, shape in zip(req.names, dtypes, req.shapes)]
        return self._apply(named, req.weight_version, req.abort_all_requests)

    def destroy_weights_update_group(self, req: protocol.DestroyWeightsUpdateGroupReqInput) -> str:
        group = self._groups.pop(req.group_name, None)
        if group is None:
            raise EngineCommandError(f"no weight update group {req.group_name!r}")
        group.close()
        return f"Destroyed weight update group {req.group_name!r}."

    def flush_cache(self) -> str:
        if self._running:
            raise EngineCommandError("Cache not flushed: requests are running.\n")
        # KV caches live only inside a wave, so an idle engine holds nothing to flush.
        return "Cache flushed.\n"

    def pause_generation(self, mode: str) -> str:
        self._paused = mode
        if mode == "abort":
            self._abort_all("generation paused with mode=abort")
        # retract and in_place act in the decode loop, which checks `_paused` every step.
        return "Generation paused successfully."

    def continue_generation(self) -> str:
        self._paused = None
        return "Generation continued successfully."

    def release_memory_occupation(self, tags: tuple[str, ...]) -> str:
        if self._running:
            raise EngineCommandError("cannot release memory while requests are running; "
                                     "pause generation first")
        if "weights" in tags and "weights" not in self._released:
            for param in self._params.values():
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        self._released.update(tags)
        if self.device.type == "cuda":  # hand the memory to the colocated trainer for real
            torch.cuda.empty_cache()
        return f"Released {sorted(tags)}."

    def resume_memory_occupation(self, tags: tuple[str, ...]) -> str:
        if "weights" in tags and "weights" in self._released:
            # Like SGLang without a CPU backup, resumed weights hold no values until an update.
            for name, param in self._params.items():
                shape, dtype = self._shapes[name]
                param.data = torch.zeros(shape, dtype=dtype, device=self.device)
        self._released.difference_update(tags)
        return f"Resumed {sorted(tags)}."

    def info(self) -> dict:
        config = self.model.config
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "tokenizer_path": self.model_path if self.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "load_format": None,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }

    def load(self) -> dict:
        """What the engine holds now, as one entry of SGLang's /v1/loads `loads` list (the
        fields this engine has: requests decoding, requests queued, their tokens)."""
        with self._lock:
            waiting = [seq for seq in self._waiting if seq.finish is None]
        running = [seq for seq in list(self._running) if seq.finish is None]
        return {"dp_rank": 0, "num_running_reqs": len(running), "num_waiting_reqs": len(waiting),
                "num_used_tokens": sum(len(seq.tokens) for seq in running),
                "max_running_requests": self.max_running_requests}

    # ------------------------------------------------------------ weights

    def _check_session(self, what: str) -> None:
        if not self._session_open:
            raise EngineCommandError(f"{what} needs an open session: call begin_weight_update "
                                     "first (SGLang >= 0.5.21)")

    def _apply(self, named: list[tuple[str, torch.Tensor]], version: str | None,
               abort_all: bool) -> str:
        if "weights" in self._released:
            raise EngineCommandError("weights are released; call resume_memory_occupation first")
        errors = []
        for name, tensor in named:
            if name not in self._params:
                errors.append(f"unknown parameter {name!r}")
            elif tuple(tensor.shape) != tuple(self._shapes[name][0]):
                errors.append(f"parameter {name!r}: shape {tuple(tensor.shape)} != "
                              f"{tuple(self._shapes[name][0])}")
            elif not (tensor.is_floating_point() or tensor.dtype == self._shapes[name][1]):
                errors.append(f"parameter {name!r}: dtype {tensor.dtype} cannot load into "
                              f"{self._shapes[name][1]}")
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise EngineCommandError("nothing loaded: " + "; ".join(errors[:5]) + more)
        if abort_all:
            self._abort_all("aborted for a weight update")
        with torch.no_grad():
            for name, tensor in named:
                self._params[name].copy_(tensor)
        if version is not None:
            self.weight_version = version
        suffix = f" Weight version updated to {version}." if version is not None else ""
        return f"Succeeded to update {len(named)} parameters.{suffix}"

    # ------------------------------------------------------------ scheduler thread

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            self._run_commands(in_wave=False)
            if self._paused is None and "weights" not in self._released and self._waiting:
                try:
                    self._run_wave()
                except Exception as exc:  # a model failure answers the wave's requests, not a hang
                    log.exception("generation wave failed")
                    for seq in list(self._running):
                        if seq.finish is None:  # samples that already finished keep their answer
                            self._finish(seq, protocol.finish_abort(f"engine error: {exc}"))
                    self._running = []
            else:
                self._wake.wait(0.05)

    def _run_commands(self, in_wave: bool) -> None:
        pending = [] if in_wave else self._deferred
        if not in_wave:
            self._deferred = []
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for command in pending:
            if in_wave and not command.during_wave:
                self._deferred.append(command)  # updates wait for the running wave
                continue
            try:
                command.future.set_result(command.fn())
            except BaseException as exc:  # every error goes back to the caller
                command.future.set_exception(exc)

    def _interrupt_wave(self) -> bool:
        """Between decode steps: run preemptive commands; True if the wave must stop now."""
        self._run_commands(in_wave=True)
        while self._paused == "in_place" and not self._stop:
            # Paused in place: the batch keeps its KV cache, every command may run.
            self._wake.clear()
            self._run_commands(in_wave=False)
            if self._paused == "in_place":
                self._wake.wait(0.05)
        if self._paused == "retract":
            with self._lock:
                for seq in reversed(self._running):
                    if seq.finish is None:
                        seq.retractions += 1
                        self._waiting.appendleft(seq)
            self._running = []
            return True
        return self._stop or all(seq.finish is not None for seq in self._running)

    def _run_wave(self) -> None:
        with self._lock:
            count = min(self.max_running_requests, len(self._waiting))
            self._running = [self._waiting.popleft() for _ in range(count)]
        for seq in list(self._running):
            if len(seq.output_ids) >= seq.req.params.max_new_tokens:
                self._finish(seq, protocol.finish_length(seq.req.params.max_new_tokens))
        active = [seq for seq in self._running if seq.finish is None]
        if not active:
            self._running = []
            return
        from transformers import DynamicCache

        tokens = [seq.tokens for seq in active]
        width = max(len(t) for t in tokens)
        host = torch.device("cpu")
        input_ids = torch.full((len(active), width), self.pad_id, dtype=torch.long, device=host)
        mask = torch.zeros((len(active), width), dtype=torch.long, device=host)
        for row, toks in enumerate(tokens):  # left padding keeps every row's last token aligned
            input_ids[row, width - len(toks):] = torch.tensor(toks, device=host)
            mask[row, width - len(toks):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        while True:
            next_tokens = self._sample(logits, active)
            keep = []
            for row, seq in enumerate(active):
                if seq.finish is None:  # an abort may have finished it meanwhile
                    self._append(seq, *next_tokens[row])
                if seq.finish is None:
                    keep.append(row)
            if self._interrupt_wave() or not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                active = [active[row] for row in keep]
            step_ids = torch.tensor([[seq.output_ids[-1]] for seq in active], device=self.device)
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype,
                                               device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self._forward(step_ids, mask, positions, cache)
        # Rows still unfinished here were retracted (back in `_waiting`) or the engine stops.
        self._running = []

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[tuple[int, float]]:
        # Greedy rows in one vectorised step; sampled rows one by one, each with its own
        # generator, so a seeded request samples the same tokens in any batch.
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1)
        greedy_logprobs = raw_logprobs.gather(-1, argmax[:, None])[:, 0]
        out = list(zip(argmax.tolist(), greedy_logprobs.tolist()))
        for row, seq in enumerate(seqs):
            params = seq.req.params
            if params.greedy:
                continue
            logprobs = torch.log_softmax(logits[row] / params.temperature, dim=-1)
            probs = _filter(logprobs.exp(), params)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
            out[row] = (token, float(logprobs[token]))
        return out

    def _append(self, seq: _Seq, token: int, logprob: float) -> None:
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        n = len(seq.output_ids)
        if seq.spans and seq.spans[-1][0] == self.weight_version:
            seq.spans[-1][2] = n
        else:
            seq.spans.append([self.weight_version, n - 1, n])
        params = seq.req.params
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops |= self.eos_ids
        if token in stops:
            self._finish(seq, protocol.finish_stop(token))
        elif n >= params.max_new_tokens or len(seq.tokens) >= self.context_len:
            self._finish(seq, protocol.finish_length(n))

    def _abort_all(self, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in self._running + waiting:
            if seq.finish is None:
                self._finish(seq, protocol.finish_abort(message))

    def _finish(self, seq: _Seq, reason: dict) -> None:
        seq.finish = reason
        seq.on_done(seq)

    def _result(self, seq: _Seq) -> dict:
        meta: dict[str, Any] = {
            "id": seq.req.rid,
            "finish_reason": seq.finish,
            "prompt_tokens": len(seq.req.input_ids),
            "weight_version": seq.spans[-1][0] if seq.spans else self.weight_version,
            "num_retractions": seq.retractions,
            "reasoning_tokens": 0,
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": 0,
            "e2e_latency": time.monotonic() - seq.started,
        }
        if seq.spans:
            meta["weight_versions"] = [{"version": v, "start": s, "end": e} for v, s, e in seq.spans]
        if seq.req.return_logprob:
            texts = ([self.tokenizer.decode([t]) for t in seq.output_ids]
                     if seq.req.return_text_in_logprobs and self.tokenizer is not None
                     else [None] * len(seq.output_ids))
            meta["output_token_logprobs"] = [
                [lp, tok, text] for lp, tok, text in zip(seq.logprobs, seq.output_ids, texts)]
        result: dict[str, Any] = {"output_ids": list(seq.output_ids), "meta_info": meta}
        if self.tokenizer is not None:
            result["text"] = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        return result


def _filter(probs: torch.Tensor, params: protocol.SamplingParams) -> torch.Tensor:
    """Top-k, then top-p, then min-p, as SGLang's sampler applies them."""
    if params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=0)
        drop = (cumulative - sorted_probs) > params.top_p * cumulative[-1]
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    return probs / probs.sum()


def _eos_ids(model: Any) -> set[int]:
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    return set()


def _load_tokenizer(model_path: str) -> Any:
    path = Path(model_path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None  # token-id-only serving, like SGLang's --skip-tokenizer-init
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _read_safetensors(model_path: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise EngineCommandError(f"no *.safetensors files in {model_path}")
    named: list[tuple[str, torch.Tensor]] = []
    for path in files:
        named.extend(load_file(str(path)).items())
    return named
