# GPU image for clusters: CUDA 12.9, torch 2.13.0, transformer-engine, apex, megatron-core,
# SGLang and or1-megatron, on Python 3.12.
#   docker build -t or1-megatron:0.1.0 .
#   docker run --gpus all --ipc=host or1-megatron:0.1.0 or1 check --tp 2
#
# Versions fit together as follows: SGLang 0.5.19-0.5.21 pin torch==2.13.0 exactly (0.5.22+
# pin 2.14.1), so torch is installed first at that version and every later step is constrained
# to it; transformer-engine and apex compile their extensions against that torch (hence the
# -devel CUDA image). megatron-core 0.16.1 is the release the CPU test suite runs; newer ones
# need Python >= 3.12, which this image has, and the code keeps working on them.
FROM nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_CUMEM_ENABLE=0 \
    TORCH_CUDA_ARCH_LIST="9.0"

RUN apt-get update && apt-get install -y --no-install-recommends \
      python3 python3-dev python3-pip git ninja-build build-essential \
      bubblewrap slurm-client munge \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3 /usr/local/bin/python

RUN echo "torch==2.13.0" > /opt/constraints.txt \
 && pip install -c /opt/constraints.txt torch==2.13.0 triton

# transformer-engine builds its PyTorch extension against the torch above.
RUN pip install -c /opt/constraints.txt --no-build-isolation "transformer-engine[pytorch]==2.9.0"

# apex is not on PyPI (PyPI's "apex" is an unrelated package: never install that one).
RUN git clone --depth 1 --branch 25.09 https://github.com/NVIDIA/apex /tmp/apex \
 && cd /tmp/apex \
 && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -c /opt/constraints.txt -v --no-build-isolation . \
 && rm -rf /tmp/apex

RUN pip install -c /opt/constraints.txt "sglang[srt]==0.5.21"

WORKDIR /opt/or1-megatron
COPY requirements ./requirements
COPY setup.py README.md ./
COPY or1_megatron ./or1_megatron
COPY configs ./configs
COPY tools ./tools
RUN pip install -c /opt/constraints.txt \
      "megatron-core==0.16.1" "omegaconf==2.4.0" "transformers==5.24.0" "safetensors==0.8.0" \
      "tokenizers==0.23.3" "psutil==7.2.2" "einops==0.8.2" \
 && pip install -c /opt/constraints.txt -e ".[gpu]" \
 && python -c "import torch, transformer_engine.pytorch, apex, sglang, megatron.core; print('stack ok', torch.__version__)"

CMD ["or1", "--help"]
