"""SGLang on GPUs: the `python -m sglang.launch_server` command line and the torch/SGLang pin.

An SGLang engine is an `EngineProcess` (launcher.py) whose command is SGLang's server, driven by
the same `HttpEngine` client as the CPU engine, since both serve SGLang's HTTP API. SGLang's PyPI
releases pin torch exactly, so the SGLang version follows from the torch version (DESIGN 5):
0.5.19-0.5.21 pin torch 2.13.0, 0.5.22 and later pin 2.14.1. `check_sglang_install` reads the
installed SGLang's own requirement and refuses a mismatch before a server is started, instead
of letting it fail deep inside CUDA kernels. Other SGLang options pass through unchanged
(`extra_args`), not re-declared here. This module never talks to an engine itself.
"""
from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import torch

from or1_megatron.errors import OR1Error
from or1_megatron.rollout.engine import HttpEngine
from or1_megatron.rollout.launcher import EngineProcess

# torch release -> the SGLang release installed with it (both pinned exactly on PyPI).
SGLANG_FOR_TORCH: dict[str, str] = {"2.13.0": "0.5.21", "2.14.1": "0.5.22"}


class SGLangVersionError(OR1Error):
    """SGLang is missing or was built for another torch than the one installed."""


def sglang_version_for_torch(torch_version: str | None = None) -> str:
    """The SGLang release to install next to `torch_version` (default: the installed torch)."""
    version = (torch_version or torch.__version__).split("+")[0]
    if version not in SGLANG_FOR_TORCH:
        raise SGLangVersionError(
            f"no SGLang release is pinned for torch {version}; known: {SGLANG_FOR_TORCH}")
    return SGLANG_FOR_TORCH[version]


def check_sglang_install() -> str:
    """Return the installed SGLang version; SGLangVersionError if absent or built for another torch."""
    try:
        installed = importlib.metadata.version("sglang")
        requires = importlib.metadata.requires("sglang") or []
    except importlib.metadata.PackageNotFoundError:
        raise SGLangVersionError(
            f"sglang is not installed; for torch {torch.__version__} install "
            f"sglang=={sglang_version_for_torch()} (pip install 'or1-megatron[sglang]')") from None
    torch_version = torch.__version__.split("+")[0]
    for requirement in requires:
        match = re.fullmatch(r"torch\s*==\s*([\w.]+)(\s*;.*)?", requirement.strip())
        if match and match.group(1) != torch_version:
            raise SGLangVersionError(
                f"sglang {installed} requires torch=={match.group(1)} but torch {torch_version} "
                f"is installed; install sglang=={sglang_version_for_torch(torch_version)}")
    return installed


class SGLangEngineProcess(EngineProcess):
    """`python -m sglang.launch_server` for one engine: tp_size GPUs from base_gpu_id, an index
    into the process's CUDA_VISIBLE_DEVICES (`env`), never a physical id."""

    def __init__(self, model_path: str | Path, *, tp_size: int = 1,
                 mem_fraction_static: float | None = None, random_seed: int = 0,
                 base_gpu_id: int = 0, dtype: str = "auto", weight_version: str = "default",
                 enable_memory_saver: bool = False, skip_tokenizer_init: bool = True,
                 python: str = sys.executable, extra_args: list[str] | None = None,
                 check_install: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.check_install = check_install
        self.model_path = str(model_path)
        self.tp_size = tp_size
        self.mem_fraction_static = mem_fraction_static
        self.random_seed = random_seed
        self.base_gpu_id = base_gpu_id
        self.dtype = dtype
        self.weight_version = weight_version
        self.enable_memory_saver = enable_memory_saver
        self.skip_tokenizer_init = skip_tokenizer_init
        self.python = python
        self.extra_args = list(extra_args or [])

    def start(self) -> None:
        """Start the server, after checking that SGLang fits the installed torch."""
        if self.check_install:
            check_sglang_install()
        super().start()

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "sglang.launch_server",
               "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
               "--tp-size", str(self.tp_size), "--random-seed", str(self.random_seed),
               "--base-gpu-id", str(self.base_gpu_id), "--dtype", self.dtype,
               "--weight-version", self.weight_version]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.enable_memory_saver:  # needed for release/resume_memory_occupation
            cmd.append("--enable-memory-saver")
        if self.skip_tokenizer_init:  # rollouts send and receive token ids only
            cmd.append("--skip-tokenizer-init")
        return cmd + self.extra_args

    def client(self, timeout_s: float = 600.0) -> HttpEngine:
        """An HTTP client for this engine; tensor updates carry one payload per TP rank."""
        return HttpEngine(self.url, tp_size=self.tp_size, timeout_s=timeout_s)
