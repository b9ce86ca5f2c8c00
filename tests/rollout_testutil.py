"""Shared pieces of the rollout tests: a tiny random Qwen2 on disk and its reference maths."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Iterator

import torch

from or1_megatron import tiny_model
from or1_megatron.rollout.launcher import CpuEngineProcess


def make_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-64, vocab-300 random Qwen2 (fp32) with room for 1024 positions."""
    return tiny_model.make_tiny_qwen2(path, seed=seed, max_position_embeddings=1024)


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perturbed_weights(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """New values for every parameter: what a training step would send."""
    generator = torch.Generator().manual_seed(seed)
    return {name: t + 0.05 * torch.randn(t.shape, generator=generator)
            for name, t in model.state_dict().items()}


def forward_logprobs(model: Any, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log p(output_t | prompt, output_<t) from one forward pass (the oracle)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output)[:, None])[:, 0]


def run(coro: Coroutine) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


async def wait_for_state(check: Callable[[], Any | Awaitable[Any]], what: str,
                         timeout_s: float = 60.0, interval_s: float = 0.02) -> Any:
    """Poll `check` (plain or async) until it returns something truthy; fail naming `what`
    after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = None
    while loop.time() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def running_cpu_engines(model_dir: Path, log_dir: Path, count: int = 1,
                        **kwargs: Any) -> Iterator[list[CpuEngineProcess]]:
    """`count` CPU engines started together and ready (120 s at most); all killed on exit."""
    procs = [CpuEngineProcess(model_dir, num_threads=1, log_dir=log_dir, start_timeout_s=120, **kwargs)
             for _ in range(count)]
    try:
        for process in procs:
            process.start()
        for process in procs:
            process.wait_ready()
        yield procs
    finally:
        for process in procs:
            process.kill()
