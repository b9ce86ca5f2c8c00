#!/usr/bin/env bash
# The `sglang_cpu` tier of the engine contract tests (issue 5): the same assertions as
# tests/test_rollout_engine_contract.py runs against `or1 serve`, run against SGLang's own CPU
# engine (`python -m sglang.launch_server` with SGLANG_USE_CPU_ENGINE=1, torch_native attention,
# fp32, import shims from tests/sglang_shims; DESIGN 5).
#
# SGLang pins torch exactly, so it lives in its own virtual environment, .venv-sglang (override
# with SGLANG_VENV=path), built here when missing: torch 2.13.0 (CPU) first and alone, then
# sglang==0.5.21 (the release pinning torch 2.13.0) WITHOUT its dependencies (they are CUDA
# kernels and wheels: flashinfer, sglang-kernel, cuda-python, ..., several GB that cannot run
# here), then the runtime dependencies its CPU server imports at start-up, then this package (no
# deps) and pytest, every version pinned by requirements/sglang-cpu.txt (SGLang's own pins where
# it has them: transformers 5.12.1, tokenizers 0.22.2). Nothing of .venv is touched.
#
# Usage: scripts/test_sglang_cpu.sh [pytest args...]   (default: the whole tier, verbose)
# Measured on a shared 2-core machine: building the venv 151 s (2.2 GB; torch from the local
# wheel, the rest from PyPI), once; the tier 2.5-3 min: one SGLang start-up (20-40 s, up to ~3 min
# when other jobs load the cores) and two restarts in the test whose payloads kill the engine.
# pip prints "sglang 0.5.21 requires X, which is not installed" for every skipped CUDA
# dependency: expected, they are left out on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SGLANG_VENV:-.venv-sglang}
TORCH_VERSION=2.13.0
SGLANG_VERSION=0.5.21

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sglang, pytest, or1_megatron" 2>/dev/null; then
  echo "building $VENV (torch $TORCH_VERSION, sglang $SGLANG_VERSION)"
  start=$(date +%s)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # Exact pins of everything (the CPU torch, SGLang's own pins, every runtime package).
  constraints=requirements/sglang-cpu.txt
  pip_install() { "$VENV/bin/python" -m pip install -q -c "$constraints" "$@"; }
  "$VENV/bin/python" -m pip install -q --upgrade pip
  pip_install "torch==$TORCH_VERSION"
  pip_install --no-deps "sglang==$SGLANG_VERSION"
  # What SGLang's CPU server imports at start-up (measured: each is a module-level import on the
  # path `python -m sglang.launch_server` takes); triton: torch's CPU wheel does not bring it.
  pip_install numpy transformers tokenizers safetensors triton \
    aiohttp fastapi uvicorn uvloop orjson pydantic pyzmq msgspec psutil requests packaging \
    setproctitle tqdm pybase64 python-multipart prometheus-client interegular \
    partial_json_parser einops pillow regex IPython dill sentencepiece==0.2.1 \
    compressed-tensors==0.18.0 gguf openai==2.6.1 jsonschema xgrammar==0.2.7 soundfile==0.13.1
  pip_install --no-deps -e .
  pip_install pytest==9.2.0 pytest-timeout==2.4.0
  "$VENV/bin/python" -c "import torch, sglang; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__; print('sglang', sglang.__version__, 'torch', torch.__version__)"
  echo "built $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi

# One thread per process (2 cores shared by the test process and the SGLang server).
export OMP_NUM_THREADS=1
exec "$VENV/bin/python" -m pytest tests/test_rollout_engine_contract.py \
  tests/test_rollout_sglang_adapter.py -m sglang_cpu \
  -p no:cacheprovider -v --durations=0 "$@"
