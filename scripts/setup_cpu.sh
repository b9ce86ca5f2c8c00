#!/usr/bin/env bash
# Create .venv with the pinned CPU stack and install or1-megatron in editable mode.
# torch is installed first and alone: with torch==2.13.0 present, nothing else can pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install_system_deps.sh
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c requirements/cpu.txt torch
.venv/bin/python -m pip install -q -c requirements/cpu.txt -e ".[dev]"
.venv/bin/python -W ignore -c "import torch, megatron.core, or1_megatron; print('or1-megatron ready: torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
