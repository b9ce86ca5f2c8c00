"""SGLang's own CPU engine as a test engine (the `sglang_cpu` tier of the contract tests).

It is SGLang's real HTTP server (`python -m sglang.launch_server`) on CPU, started the way DESIGN 5
measured it: `SGLANG_USE_CPU_ENGINE=1`, `--device cpu --attention-backend torch_native`, fp32,
and the import shims in tests/sglang_shims on the server's PYTHONPATH only. The tier runs when
SGLang is importable in the interpreter running pytest, which must also be the one running the
server: the payload encoder then pickles SGLang's own `FlattenedTensorMetadata` class, the only
one SGLang's allow-list unpickler accepts. scripts/test_sglang_cpu.sh builds `.venv-sglang` with
the SGLang release that pins our torch and runs this tier there.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SHIMS_DIR = Path(__file__).resolve().parent / "sglang_shims"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Start-up measured at ~20 s on an idle 2-core machine, up to ~3 min when the cores are shared.
START_TIMEOUT_S = 600.0


def unavailable_reason() -> str | None:
    """Why the sglang_cpu tier cannot run in this interpreter, or None when it can."""
    if importlib.util.find_spec("sglang") is None:
        return (f"sglang is not installed in {sys.executable}; "
                f"scripts/test_sglang_cpu.sh builds .venv-sglang and runs this tier")
    from or1_megatron.rollout.sglang_adapter import SGLangVersionError, check_sglang_install

    try:
        check_sglang_install()
    except SGLangVersionError as exc:
        return str(exc)
    return None


def sglang_cpu_engine(model_dir: str | Path, log_dir: str | Path, **kwargs):
    """An SGLangEngineProcess serving `model_dir` with SGLang's CPU engine (not started yet)."""
    from or1_megatron.rollout.sglang_adapter import SGLangEngineProcess

    python_path = [str(SHIMS_DIR), str(REPO_ROOT)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": os.pathsep.join(python_path),
           "OMP_NUM_THREADS": "1"}
    extra_args = ["--device", "cpu", "--attention-backend", "torch_native",
                  # a small KV pool: the default takes 74% of host memory
                  "--max-total-tokens", "8192", "--max-running-requests", "64",
                  "--log-level", "info"]
    return SGLangEngineProcess(model_dir, dtype="float32", python=sys.executable, env=env,
                               extra_args=extra_args + list(kwargs.pop("extra_args", [])),
                               log_dir=log_dir, start_timeout_s=START_TIMEOUT_S, **kwargs)
