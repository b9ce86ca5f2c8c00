# GPU image for clusters: CUDA 13.0, torch 2.13.0, transformer-engine 2.17.1, megatron-core 0.16.1,
# SGLang 0.5.21 and or1-megatron, on Python 3.12 (Ubuntu 24.04).
#   docker build -t or1-megatron:0.1.0 .
#   docker run --gpus all --ipc=host or1-megatron:0.1.0 or1 check --tp 2
#
# Every Python package is pinned in requirements/gpu.txt, whose header says how the versions fit;
# tests/test_gpu_requirements.py resolves that file against the package index in CI. torch 2.13.0's
# wheel on the index is its CUDA 13.0 build, so the base is CUDA 13.0's -devel image: the one
# compiled step, transformer_engine_torch, builds against that torch with that CUDA's headers
# (a check below stops the build if torch's CUDA and the image's differ). The wheels go in exactly
# as pinned (--no-deps), then the source-only packages, then or1-megatron; `pip check` ends the
# build. apex is not installed: megatron-core takes FusedAdam and its fused kernels from
# transformer-engine first. Building needs PyPI and, for cuda-tile, NVIDIA's index
# (pypi.nvidia.com).
FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

# parallel compile jobs for transformer_engine_torch (each takes a few GB of memory)
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_CUMEM_ENABLE=0 \
    TORCH_CUDA_ARCH_LIST="9.0"

# A virtual environment keeps pip away from Debian's own Python packages (which pip cannot
# uninstall) and lets `pip check` judge only what requirements/gpu.txt installed.
RUN apt-get update && apt-get install -y --no-install-recommends \
      python3 python3-dev python3-venv git ninja-build build-essential \
      bubblewrap slurm-client munge \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install pip==26.3

WORKDIR /opt/or1-megatron
COPY requirements ./requirements

# 1. Every wheel, exactly as pinned.
RUN pip install --no-deps --only-binary=:all: -r requirements/gpu.txt \
 && python -c "import os, torch; image = os.environ['CUDA_VERSION'].rsplit('.', 1)[0]; \
assert torch.version.cuda == image, \
    f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, the image has {image}'"

# 2. The `# source-only:` pins of requirements/gpu.txt. transformer_engine_torch compiles against
#    the torch above (FORCE_BUILD: no prebuilt wheel fetched from elsewhere); cuda-tile's wheel is
#    on NVIDIA's index (PyPI has only a stub sdist that downloads it from there).
RUN sed -n 's/^# source-only: *//p' requirements/gpu.txt > /tmp/gpu-source.txt \
 && TE_TORCH=$(grep '^transformer_engine_torch==' /tmp/gpu-source.txt) \
 && CUDA_TILE=$(grep '^cuda-tile==' /tmp/gpu-source.txt) \
 && NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=$MAX_JOBS \
      pip install -v --no-deps --no-build-isolation "$TE_TORCH" \
 && pip install --no-deps --only-binary=:all: --extra-index-url https://pypi.nvidia.com \
      "$CUDA_TILE" \
 && rm /tmp/gpu-source.txt

# 3. or1-megatron itself: its install_requires and `gpu` extra are all pinned above.
COPY setup.py README.md ./
COPY or1_megatron ./or1_megatron
COPY configs ./configs
COPY tools ./tools
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import torch, transformer_engine.pytorch, sglang, megatron.core, or1_megatron; \
print('stack ok: torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && pip check

CMD ["or1", "--help"]
