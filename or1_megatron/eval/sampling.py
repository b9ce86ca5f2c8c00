"""Sample responses to problems through rollout engines and score them with the reward pool.

The one sampling + scoring path shared by `or1 eval` (avg@k / pass@k) and
`tools/estimate_difficulty.py` (pass rates for the offline filter). It owns: loading the problem
files for these commands, rendering and tokenizing prompts with the model directory's tokenizer,
the engines (CPU `or1 serve` processes, SGLang on GPUs, or servers attached by URL) behind a
`RolloutRouter`, per-sample sampling seeds, and feeding finished problems to the `RewardPool`
while generation goes on. It keeps per sample only the reward, finish reason and length, never
the text, so a 100K-prompt difficulty run holds little memory. It computes no metrics
(metrics.py does) and writes no files (the commands do).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from or1_megatron.data.chat_template import render_chat
from or1_megatron.data.loaders import CONVERTERS, load_problems
from or1_megatron.data.records import DataError, ProblemRecord
from or1_megatron.errors import OR1Error
from or1_megatron.eval.metrics import ProblemCount
from or1_megatron.progress import Progress
from or1_megatron.rewards.config import RewardConfig

ENGINE_KINDS = ("auto", "cpu", "sglang")
# Requests kept in flight per engine when --max-inflight is not given: enough to fill a CPU
# engine's wave (its default max_running_requests) or to keep SGLang's continuous batching busy.
INFLIGHT_PER_ENGINE = {"cpu": 64, "sglang": 256}


class SamplingError(OR1Error):
    """Sampling cannot start or a request was refused; the message names the model, file or problem."""


@dataclass
class SamplingSettings:
    """Sampling parameters of every request (OR1's evaluation: T=1.0, top_p=1)."""

    max_new_tokens: int = 32768
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from or1_megatron.rollout.protocol import RequestError, SamplingParams

        if self.max_new_tokens < 1:  # the engines accept 0, but a response needs a token
            raise SamplingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        try:  # the engines' own checks, here before any engine starts
            SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           top_p=self.top_p).validate()
        except RequestError as exc:
            raise SamplingError(str(exc)) from None

    def sampling_params(self, uid: str, index: int, stop_token_ids: list[int]) -> dict[str, Any]:
        """SGLang sampling params of sample `index` of problem `uid`.

        The seed is derived from (seed, uid, index), not from the position in the run, so a
        problem's samples are the same whichever files or limits it was loaded with.
        """
        digest = hashlib.blake2b(f"{self.seed}:{uid}:{index}".encode(), digest_size=7).digest()
        params: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "temperature": self.temperature, "top_p": self.top_p,
                                  "sampling_seed": int.from_bytes(digest, "big")}
        if stop_token_ids:
            params["stop_token_ids"] = list(stop_token_ids)
        return params


@dataclass
class EngineOptions:
    """Which engines serve the samples: started here (`count` of `kind`) or attached by URL."""

    kind: str = "auto"  # auto: SGLang when CUDA is available, else the CPU engine
    count: int = 1
    urls: list[str] = field(default_factory=list)  # attach to running servers instead
    tp_size: int = 1  # SGLang: GPUs per engine
    threads: int | None = None  # CPU engine: torch threads each (default: cores / count)
    extra_args: list[str] = field(default_factory=list)  # passed through to each server
    start_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    log_dir: str | None = None
    seed: int = 0

    def resolved_kind(self) -> str:
        if self.kind not in ENGINE_KINDS:
            raise SamplingError(f"engine kind must be one of {ENGINE_KINDS}, got {self.kind!r}")
        if self.kind != "auto":
            return self.kind
        import torch

        return "sglang" if torch.cuda.is_available() else "cpu"


@dataclass
class ProblemOutcome:
    """The scored samples of one problem."""

    uid: str
    data_source: str
    ability: str
    scores: list[float]
    finish_reasons: list[str]
    response_tokens: list[int]
    reward_errors: int = 0

    @property
    def samples(self) -> int:
        return len(self.scores)

    @property
    def correct(self) -> int:
        return sum(score >= 1.0 for score in self.scores)  # SolveTracker's rule

    @property
    def truncated(self) -> int:
        return sum(reason == "length" for reason in self.finish_reasons)

    def count(self) -> ProblemCount:
        return ProblemCount(self.data_source, self.samples, self.correct, self.truncated)

    def summary(self) -> dict[str, Any]:
        """What the result files keep per problem."""
        return {"uid": self.uid, "data_source": self.data_source, "samples": self.samples,
                "correct": self.correct, "truncated": self.truncated,
                "mean_response_tokens": sum(self.response_tokens) / self.samples,
                "reward_errors": self.reward_errors}


# ---- inputs -------------------------------------------------------------------------------------

def load_records(paths: Sequence[str | Path], fmt: str = "auto", on_error: str = "raise",
                 limit: int | None = None) -> list[ProblemRecord]:
    """Problems of every file in order (the first `limit` of each); uids must be unique, since
    results are keyed by them."""
    records: list[ProblemRecord] = []
    seen: dict[str, str] = {}
    for path in paths:
        loaded = load_problems(path, fmt, on_error)
        if limit is not None:
            loaded = loaded[:limit]
        for record in loaded:
            if record.uid in seen:
                raise DataError(str(path), None, f"uid {record.uid!r} is also in {seen[record.uid]}; "
                                "uids must be unique across the data files")
            seen[record.uid] = str(path)
        records.extend(loaded)
    if not records:
        raise DataError(", ".join(map(str, paths)), None, "no problems to sample")
    return records


def samples_per_problem(records: Sequence[ProblemRecord], explicit: int | None,
                        default: Callable[[ProblemRecord], int]) -> list[int]:
    """`explicit` samples for every problem when given, else `default(record)` per problem."""
    counts = [explicit if explicit is not None else default(r) for r in records]
    for record, n in zip(records, counts):
        if n < 1:
            raise SamplingError(f"problem {record.uid}: samples per problem must be >= 1, got {n}")
    return counts


def load_tokenizer(model_path: str | Path) -> Any:
    """The model directory's tokenizer; SamplingError naming the directory when it has none."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise SamplingError(f"{path}: not a Hugging Face model directory (no config.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise SamplingError(f"{path}: cannot load its tokenizer: {exc}") from exc


def prompt_token_ids(tokenizer: Any, record: ProblemRecord) -> list[int]:
    """The prompt as the policy sees it: the tokenizer's chat template with the generation prompt
    (R1-Distill's opens the assistant turn with `<think>\\n`), or `render_chat` (the same format)
    when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = render_chat(record.prompt, add_generation_prompt=True)
    # The rendered text starts with BOS already.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- engines ------------------------------------------------------------------------------------

def engine_processes(model_path: str | Path, options: EngineOptions) -> list[Any]:
    """Engine process objects (not started) for `options`."""
    from or1_megatron.rollout.launcher import AttachedEngine, CpuEngineProcess

    if options.urls:
        return [AttachedEngine(url, start_timeout_s=min(options.start_timeout_s, 60.0))
                for url in options.urls]
    if options.count < 1:
        raise SamplingError(f"--engines must be >= 1, got {options.count}")
    path = Path(model_path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        # Found here in a second, not by every engine after a minute of start-up.
        raise SamplingError(f"{path}: no model weights (*.safetensors or pytorch_model*.bin) to serve")
    common = {"log_dir": options.log_dir, "start_timeout_s": options.start_timeout_s}
    if options.resolved_kind() == "cpu":
        threads = options.threads or max(1, (os.cpu_count() or 1) // options.count)
        return [CpuEngineProcess(model_path, random_seed=options.seed + i, num_threads=threads,
                                 extra_args=options.extra_args, **common)
                for i in range(options.count)]
    import torch

    from or1_megatron.rollout.sglang_adapter import SGLangEngineProcess

    needed, present = options.count * options.tp_size, torch.cuda.device_count()
    if needed > present:
        raise SamplingError(f"{options.count} SGLang engines x tp {options.tp_size} need {needed} "
                            f"GPUs; {present} visible")
    return [SGLangEngineProcess(model_path, tp_size=options.tp_size, base_gpu_id=i * options.tp_size,
                                random_seed=options.seed + i, extra_args=options.extra_args, **common)
            for i in range(options.count)]


# ---- sampling -----------------------------------------------------------------------------------

def _inflight_per_engine(process: Any) -> int:
    from or1_megatron.rollout.sglang_adapter import SGLangEngineProcess

    return INFLIGHT_PER_ENGINE["sglang" if isinstance(process, SGLangEngineProcess) else "cpu"]


class SamplingSession:
    """Engines behind a router, the model's tokenizer and a reward pool, for one or more `sample`
    calls. `async with SamplingSession(...) as session: await session.sample(...)`.

    `engines`: EngineOptions (processes are started here and killed on exit) or ready engine
    process objects (adopted: started if not running, left running on exit).
    """

    def __init__(self, model_path: str | Path, engines: EngineOptions | Sequence[Any], *,
                 reward_workers: int = 2, reward_config: RewardConfig | None = None,
                 reward_modules: Sequence[str] = (), max_inflight: int | None = None,
                 request_timeout_s: float = 3600.0, resync: Any = None):
        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        self.own_engines = isinstance(engines, EngineOptions)
        if isinstance(engines, EngineOptions):
            self.processes = engine_processes(model_path, engines)
            request_timeout_s = engines.request_timeout_s
        else:
            self.processes = list(engines)
        self.max_inflight = max_inflight or sum(map(_inflight_per_engine, self.processes))
        self.request_timeout_s = request_timeout_s
        self.reward_workers = reward_workers
        self.reward_config = reward_config
        self.reward_modules = list(reward_modules)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # The engine stops at the model's EOS already; the tokenizer's may differ (base models
        # whose generation_config predates the chat template), and it ends a response too.
        self.stop_token_ids = [eos] if isinstance(eos, int) else []
        self.resync = resync  # how a restarted engine gets the current weights (the router's hook)
        self.router: Any = None
        self.pool: Any = None
        self.scoring: asyncio.Task | None = None  # the reward batch in flight, if any

    async def __aenter__(self) -> "SamplingSession":
        from or1_megatron.rewards.pool import RewardPool
        from or1_megatron.rollout.launcher import AttachedEngine, EngineStartError
        from or1_megatron.rollout.router import RolloutRouter

        self.router = RolloutRouter(self.processes, request_timeout_s=self.request_timeout_s,
                                    start_timeout_s=self.processes[0].start_timeout_s,
                                    # all engines down: wait for a restart, not for ever
                                    wait_for_engine_s=self.processes[0].start_timeout_s + 60.0,
                                    resync=self.resync)
        try:
            # Start the reward workers while the engines load; both take seconds.
            pool_task = asyncio.create_task(asyncio.to_thread(
                RewardPool, self.reward_workers, self.reward_config, reward_modules=self.reward_modules))
            try:
                await self.router.start()
            except EngineStartError as exc:
                logs = sorted({str(p.log_path) for p in self.processes
                               if self.own_engines and not isinstance(p, AttachedEngine)})
                raise SamplingError(f"rollout engines failed to start: {exc}"
                                    + (f"\nengine logs: {', '.join(logs)}" if logs else "")) from exc
            finally:
                self.pool = await pool_task
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.scoring is not None:  # a failed run may leave a batch scoring: let it end first
            await asyncio.gather(self.scoring, return_exceptions=True)
            self.scoring = None
        if self.router is not None:
            await self.router.close(kill_engines=self.own_engines)
            self.router = None
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
            self.pool = None

    async def sample(self, records: Sequence[ProblemRecord], counts: Sequence[int],
                     settings: SamplingSettings, *,
                     on_problem: Callable[[ProblemOutcome], None] | None = None,
                     label: str = "sampling") -> list[ProblemOutcome]:
        """`counts[i]` samples of problem i, scored; outcomes in problem order.

        Problems are scored as soon as their last sample is back, while later ones generate;
        `on_problem` is called with each outcome as it is scored (e.g. to append it to a file).
        """
        if len(counts) != len(records):
            raise ValueError(f"{len(counts)} sample counts for {len(records)} problems")
        run = _Run(self, records, counts, settings, on_problem, Progress(sum(counts), label))
        return await run.execute()


class _Run:
    """The state of one `SamplingSession.sample` call: generation workers feed a scorer."""

    def __init__(self, session: SamplingSession, records: Sequence[ProblemRecord],
                 counts: Sequence[int], settings: SamplingSettings,
                 on_problem: Callable[[ProblemOutcome], None] | None, progress: Progress):
        self.session, self.records, self.counts = session, records, list(counts)
        self.settings, self.on_problem, self.progress = settings, on_problem, progress
        self.run_id = uuid.uuid4().hex[:8]
        self.outcomes: list[ProblemOutcome | None] = [None] * len(records)
        # Per problem in flight only: prompt ids until its last sample is sent, responses until scored.
        self.prompts: dict[int, list[int]] = {}
        self.responses: dict[int, list[tuple[str, str, int]]] = {}
        self.pending = list(counts)
        self.ready: asyncio.Queue[int] = asyncio.Queue()
        # One shared iterator of (problem, sample): workers take jobs in problem order, so only
        # about max_inflight / k problems are in flight at any time.
        self.jobs = ((p, j) for p, n in enumerate(self.counts) for j in range(n))

    async def execute(self) -> list[ProblemOutcome]:
        workers = min(self.session.max_inflight, sum(self.counts))
        tasks = [asyncio.create_task(self._generate()) for _ in range(workers)]
        tasks.append(asyncio.create_task(self._score()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [outcome for outcome in self.outcomes if outcome is not None]

    def _prompt(self, p: int, j: int) -> list[int]:
        if j == 0:
            self.prompts[p] = prompt_token_ids(self.session.tokenizer, self.records[p])
            self.responses[p] = [("", "", 0)] * self.counts[p]
        # The last sample of a problem takes its prompt out of the cache.
        return self.prompts.pop(p) if j == self.counts[p] - 1 else self.prompts[p]

    async def _generate(self) -> None:
        from or1_megatron.rollout.engine import EngineError

        session = self.session
        for p, j in self.jobs:
            record = self.records[p]
            ids = self._prompt(p, j)
            params = self.settings.sampling_params(record.uid, j, session.stop_token_ids)
            try:
                result = await session.router.generate(ids, params, return_logprob=False,
                                                       rid=f"{self.run_id}-{p}-{j}")
            except EngineError as exc:
                raise SamplingError(f"problem {record.uid} ({record.data_source}), sample {j}: "
                                    f"the engine refused the request: {exc.message}") from exc
            text = session.tokenizer.decode(result.output_ids, skip_special_tokens=True)
            self.responses[p][j] = (text, result.finish_reason, len(result.output_ids))
            self.pending[p] -= 1
            if self.pending[p] == 0:
                self.ready.put_nowait(p)

    async def _score(self) -> None:
        left = len(self.records)
        while left:
            batch = [await self.ready.get()]
            while not self.ready.empty():
                batch.append(self.ready.get_nowait())
            tasks, owners = [], []
            for p in batch:
                for text, finish_reason, _ in self.responses[p]:
                    tasks.append(self.records[p].reward_task(text, finish_reason))
                    owners.append(p)
            pool = self.session.pool
            # Shielded and kept on the session: cancelling this run must not close the pool under
            # a map that is still running in its thread.
            self.session.scoring = asyncio.create_task(asyncio.to_thread(pool.map, tasks))
            try:
                scores = await asyncio.shield(self.session.scoring)
            except RuntimeError as exc:  # the pool cannot score at all (workers or sandbox broken)
                raise SamplingError(f"the reward pool failed: {exc}") from exc
            self.session.scoring = None
            failed = [owners[index] for index, _ in pool.errors]
            start = 0
            for p in batch:
                n = self.counts[p]
                record, responses = self.records[p], self.responses.pop(p)
                outcome = ProblemOutcome(
                    uid=record.uid, data_source=record.data_source, ability=record.ability,
                    scores=scores[start:start + n], finish_reasons=[r[1] for r in responses],
                    response_tokens=[r[2] for r in responses], reward_errors=failed.count(p))
                start += n
                self.outcomes[p] = outcome
                if self.on_problem is not None:
                    self.on_problem(outcome)
            self.progress.update(len(tasks))
            left -= len(batch)


# ---- command-line plumbing shared by `or1 eval` and tools/estimate_difficulty.py ---------------

def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The model, data, sampling, engine and reward options both commands take."""
    parser.add_argument("--model-path", required=True,
                        help="Hugging Face model directory (weights + tokenizer)")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE",
                        help="problem files (.parquet, .json, .jsonl[.gz]) in any supported schema")
    parser.add_argument("--format", default="auto", choices=["auto", *CONVERTERS],
                        help="row schema of the data files (default: detected from the first row)")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="count and skip malformed rows instead of stopping at the first")
    parser.add_argument("--limit", type=int, default=None, help="use the first N problems of each file")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="base of the per-sample sampling seeds")
    engines = parser.add_argument_group("engines")
    engines.add_argument("--engines", type=int, default=1, help="engine servers to start")
    engines.add_argument("--engine", choices=ENGINE_KINDS, default="auto",
                         help="cpu: `or1 serve` processes; sglang: SGLang servers on GPUs; "
                              "auto: sglang when CUDA is available")
    engines.add_argument("--engine-url", action="append", default=[], metavar="URL",
                         help="use a running engine server instead of starting any (repeatable)")
    engines.add_argument("--tp-size", type=int, default=1, help="GPUs per SGLang engine")
    engines.add_argument("--engine-threads", type=int, default=None,
                         help="torch threads per CPU engine (default: cores / engines)")
    engines.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                         help="extra server argument passed through unchanged (repeatable), "
                              "e.g. --engine-arg=--mem-fraction-static --engine-arg=0.8")
    engines.add_argument("--engine-log-dir", default=None, help="engine logs (default /tmp/or1_engine_logs)")
    engines.add_argument("--start-timeout", type=float, default=600.0, help="seconds for engines to start")
    engines.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    engines.add_argument("--max-inflight", type=int, default=None,
                         help="requests in flight over all engines (default 64 per CPU engine, "
                              "256 per SGLang engine)")
    rewards = parser.add_argument_group("rewards")
    rewards.add_argument("--reward-workers", type=int, default=min(8, os.cpu_count() or 1))
    rewards.add_argument("--reward-module", action="append", default=[], metavar="MODULE",
                         help="module that registers extra rewards with register_reward (repeatable)")


def records_from_args(args: argparse.Namespace) -> list[ProblemRecord]:
    return load_records(args.data, args.format, "skip" if args.skip_bad_rows else "raise", args.limit)


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def engine_options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(kind=args.engine, count=args.engines, urls=list(args.engine_url),
                         tp_size=args.tp_size, threads=args.engine_threads,
                         extra_args=list(args.engine_arg), start_timeout_s=args.start_timeout,
                         request_timeout_s=args.request_timeout, log_dir=args.engine_log_dir,
                         seed=args.seed)


def sample_from_args(args: argparse.Namespace, records: Sequence[ProblemRecord],
                     counts: Sequence[int], *, label: str,
                     on_problem: Callable[[ProblemOutcome], None] | None = None) -> list[ProblemOutcome]:
    """Start the engines and the reward pool the options ask for, sample, score, shut down."""
    options = engine_options_from_args(args)
    settings = settings_from_args(args)

    async def run() -> list[ProblemOutcome]:
        session = SamplingSession(args.model_path, options, reward_workers=args.reward_workers,
                                  reward_modules=args.reward_module, max_inflight=args.max_inflight)
        async with session:
            return await session.sample(records, counts, settings, on_problem=on_problem, label=label)

    return asyncio.run(run())


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a result file records."""
    options = engine_options_from_args(args)
    return {**asdict(settings_from_args(args)),
            "engine": "attached" if options.urls else options.resolved_kind(),
            "engines": len(options.urls) or options.count, "engine_urls": options.urls,
            "tp_size": options.tp_size, "data_files": [str(p) for p in args.data],
            "format": args.format, "limit": args.limit}
