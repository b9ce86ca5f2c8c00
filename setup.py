"""or1-megatron: Skywork-OR1 reinforcement learning on Megatron-core with SGLang rollouts.

Install on CPU machines with ``bash scripts/setup_cpu.sh`` (exact pins in requirements/cpu.txt);
GPU clusters use the Dockerfile. Ranges below stay loose enough for NVIDIA's PyTorch images,
whose torch must never be replaced.
"""
from setuptools import find_packages, setup

setup(
    name="or1-megatron",
    version="0.1.0",
    description="Skywork-OR1 (MAGIC) RL trainer: Megatron-core policy, SGLang rollouts, fused kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["or1_megatron", "or1_megatron.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        # 0.16.1 is the last release for Python 3.11; GPU images on 3.12 may take newer ones.
        "megatron-core>=0.16.1,<0.20",
        "omegaconf>=2.4.0",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "safetensors>=0.5",
        "psutil>=5.9",
        "einops>=0.8",
        "numpy>=1.26",
        "aiohttp>=3.9",
        "math-verify>=0.9.0",
        "pyarrow>=14",
        # the code sandbox runs this environment's python: contest programs import it
        "sortedcontainers>=2.4",
        # the training loop: placement and actors, TensorBoard scalars
        "ray>=2.40",
        "tensorboard>=2.15",
    ],
    extras_require={
        "gpu": [
            "transformer-engine[pytorch]>=2.8",
        ],
        # SGLang pins torch exactly: 0.5.19-0.5.21 need torch 2.13.0, 0.5.22+ need 2.14.1.
        "sglang": [
            "sglang==0.5.21",  # 0.5.21 has no [srt] extra
        ],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # unpinned: on GPUs torch pins its own triton; CPU installs take requirements/cpu.txt's
            "triton",
        ],
    },
    entry_points={"console_scripts": ["or1=or1_megatron.cli:main"]},
)
