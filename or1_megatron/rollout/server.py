"""`or1 serve`: the CPU engine behind SGLang's HTTP endpoints (same paths, bodies and answers).

Endpoints: GET /health, /health_generate, /ready, /model_info, /get_model_info; POST /generate,
/begin_weight_update, /end_weight_update, /update_weights_from_tensor, /update_weights_from_disk,
/init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
/pause_generation, /continue_generation, /release_memory_occupation, /resume_memory_occupation;
GET|POST /flush_cache. A bad request gets SGLang's error answer (400 with
`{"error": {"message": ...}}` or `{"success": false, "message": ...}`) and the engine keeps
serving. Difference: release/resume answer `{"success", "message"}` where SGLang answers null.

This module owns HTTP only: parsing into protocol dataclasses, calling the engine, shaping answers.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import torch
from aiohttp import web

from or1_megatron.rollout import protocol
from or1_megatron.rollout.cpu_engine import CpuEngine, EngineCommandError

log = logging.getLogger(__name__)
ENGINE_KEY = web.AppKey("engine", CpuEngine)
_rid_counter = itertools.count()


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response(protocol.error_body(message), status=status)


async def _body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except ValueError as exc:
        raise protocol.RequestError(f"body is not valid JSON: {exc}") from None


async def _run(engine: CpuEngine, fn: Callable[[], Any], during_wave: bool = False) -> Any:
    return await asyncio.wrap_future(engine.call(fn, during_wave=during_wave))


async def generate(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        req = protocol.parse_generate(await _body(request))
        if req.text is not None:
            if engine.tokenizer is None:
                raise protocol.RequestError("'text' needs a tokenizer in the model directory; "
                                            "send 'input_ids'")
            texts = req.text if isinstance(req.text, list) else [req.text]
            prompts = [engine.tokenizer.encode(t) for t in texts]
        else:
            prompts = req.input_ids if req.is_batch else [req.input_ids]
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            raise protocol.RequestError("input_ids must be a list of ints or a list of lists")
        samples = protocol.expand_generate_request(req, prompts, f"req{next(_rid_counter)}")
        future = engine.submit(samples)
    except protocol.RequestError as exc:
        return _error(str(exc))
    results = await asyncio.wrap_future(future)
    single = not req.is_batch and len(results) == 1
    return web.json_response(results[0] if single else results)


def _success_endpoint(parse_cls: type | None, method: Callable[..., str],
                      during_wave: Callable[[Any], bool] = lambda req: False,
                      args: Callable[[Any], tuple] = lambda req: (req,),
                      extra: dict | None = None) -> Callable:
    """An endpoint answering SGLang's `{"success", "message"}` (+ `extra`) with 200 or 400."""

    async def handler(request: web.Request) -> web.Response:
        engine = request.app[ENGINE_KEY]
        try:
            req = protocol.parse(parse_cls, await _body(request)) if parse_cls else None
        except protocol.RequestError as exc:
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        bound = getattr(engine, method.__name__)
        try:
            message = await _run(engine, lambda: bound(*args(req)), during_wave(req))
        except EngineCommandError as exc:
            return web.json_response({"success": False, "message": str(exc), **(extra or {})},
                                     status=400)
        except Exception as exc:  # any other failure is an answer too, never a dead engine
            log.exception("%s failed", method.__name__)
            message = f"{type(exc).__name__}: {exc}"
            return web.json_response({"success": False, "message": message, **(extra or {})},
                                     status=400)
        return web.json_response({"success": True, "message": message, **(extra or {})})

    return handler


def _abort_first(req: Any) -> bool:
    """Updates wait for the running wave unless they abort it (SGLang's abort_all_requests)."""
    return bool(getattr(req, "abort_all_requests", False))


def _always(req: Any) -> bool:
    """Opening or closing a session only sets a flag: no need to wait for the running wave."""
    return True


async def pause_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        req = protocol.parse(protocol.PauseGenerationReqInput, await _body(request))
    except protocol.RequestError as exc:
        return _error(str(exc))
    message = await _run(engine, lambda: engine.pause_generation(req.mode), during_wave=True)
    return web.json_response({"message": message, "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        protocol.parse(protocol.ContinueGenerationReqInput, await _body(request))
    except protocol.RequestError as exc:
        return _error(str(exc))
    message = await _run(engine, engine.continue_generation, during_wave=True)
    return web.json_response({"message": message, "status": "ok"})


async def flush_cache(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        text = await _run(engine, engine.flush_cache, during_wave=True)
    except EngineCommandError as exc:
        return web.Response(text=str(exc), status=400)
    return web.Response(text=text)


def _memory_endpoint(name: str) -> Callable:
    async def handler(request: web.Request) -> web.Response:
        engine = request.app[ENGINE_KEY]
        try:
            req = protocol.parse(protocol.MemoryOccupationReqInput, await _body(request))
            message = await _run(engine, lambda: getattr(engine, name)(req.resolved_tags))
        except (protocol.RequestError, EngineCommandError) as exc:
            return _error(str(exc))
        return web.json_response({"success": True, "message": message})

    return handler


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[ENGINE_KEY].alive else 503)


async def health_generate(request: web.Request) -> web.Response:
    """Generate one token (SGLang's health_generate); 503 if the engine cannot within 20 s."""
    engine = request.app[ENGINE_KEY]
    if not engine.alive:
        return web.Response(status=503)
    sample = protocol.SampleRequest(f"HEALTH_CHECK_{next(_rid_counter)}", [0],
                                    protocol.SamplingParams(max_new_tokens=1, temperature=0.0),
                                    return_logprob=False)
    try:
        await asyncio.wait_for(asyncio.wrap_future(engine.submit([sample])), timeout=20)
    except asyncio.TimeoutError:
        return web.Response(status=503)
    return web.Response(status=200)


async def loads(request: web.Request) -> web.Response:
    """SGLang's GET /v1/loads: per-DP-rank load; this engine has one rank."""
    return web.json_response({"version": "or1-cpu", "loads": [request.app[ENGINE_KEY].load()]})


async def model_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[ENGINE_KEY].info())


def build_app(engine: CpuEngine) -> web.Application:
    """The aiohttp application serving `engine` (also used in-process by tests)."""
    app = web.Application(client_max_size=1 << 30)
    app[ENGINE_KEY] = engine
    E = CpuEngine
    app.router.add_get("/health", health)
    app.router.add_get("/ready", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/v1/loads", loads)
    app.router.add_route("*", "/generate", generate)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/begin_weight_update",
                        _success_endpoint(protocol.BeginWeightUpdateReqInput, E.begin_weight_update,
                                          _always, args=lambda req: ()))
    app.router.add_post("/end_weight_update",
                        _success_endpoint(protocol.EndWeightUpdateReqInput, E.end_weight_update,
                                          _always, args=lambda req: ()))
    app.router.add_post("/update_weights_from_tensor",
                        _success_endpoint(protocol.UpdateWeightsFromTensorReqInput,
                                          E.update_weights_from_tensor, _abort_first))
    app.router.add_post("/update_weights_from_disk",
                        _success_endpoint(protocol.UpdateWeightFromDiskReqInput,
                                          E.update_weights_from_disk, _abort_first,
                                          extra={"num_paused_requests": 0}))
    app.router.add_post("/init_weights_update_group",
                        _success_endpoint(protocol.InitWeightsUpdateGroupReqInput,
                                          E.init_weights_update_group))
    app.router.add_post("/update_weights_from_distributed",
                        _success_endpoint(protocol.UpdateWeightsFromDistributedReqInput,
                                          E.update_weights_from_distributed, _abort_first))
    app.router.add_post("/destroy_weights_update_group",
                        _success_endpoint(protocol.DestroyWeightsUpdateGroupReqInput,
                                          E.destroy_weights_update_group))
    app.router.add_post("/pause_generation", pause_generation)
    app.router.add_post("/continue_generation", continue_generation)
    app.router.add_route("*", "/release_memory_occupation",
                         _memory_endpoint("release_memory_occupation"))
    app.router.add_route("*", "/resume_memory_occupation",
                         _memory_endpoint("resume_memory_occupation"))
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="or1 serve",
        description="Serve a Hugging Face causal LM with SGLang's HTTP API (CPU, or a GPU).")
    parser.add_argument("--model-path", required=True, help="local Hugging Face model directory")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--weight-version", default="default")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: the same engine on this process's first visible GPU")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the process that started this server dies (set by the "
                             "trainer and the tools, so a killed run leaves no engine behind)")
    return parser.parse_args(argv)


def exit_with_parent(interval_s: float = 1.0) -> None:
    """Exit at once when the parent process dies (this process is then re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    """Entry point of `or1 serve`."""
    args = parse_args(argv)
    if args.exit_with_parent:
        exit_with_parent()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = CpuEngine(args.model_path, random_seed=args.random_seed,
                       max_running_requests=args.max_running_requests,
                       weight_version=args.weight_version,
                       served_model_name=args.served_model_name, dtype=getattr(torch, args.dtype),
                       device=args.device)
    engine.start()
    print(f"or1 serve: {args.model_path} on http://{args.host}:{args.port} (pid {os.getpid()})",
          flush=True)
    try:
        web.run_app(build_app(engine), host=args.host, port=args.port, print=None,
                    access_log=None, handle_signals=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
