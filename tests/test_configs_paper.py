"""The paper's stage configs (OR1-7B, OR1-32B, OR1-Math-7B) load, validate and follow DESIGN section 4."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from or1_megatron.config import load_config
from or1_megatron.config.stages import resolve_stages, total_steps

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "models"

# config -> (model config.json, [(first step, end step, max response, prompts, mini-batch, group)])
PAPER = {
    "or1_7b.yaml": ("deepseek-r1-distill-qwen-7b.json",
                    [(0, 660, 16384, 256, 256, 16), (660, 1320, 32768, 160, 160, 32)]),
    "or1_32b.yaml": ("deepseek-r1-distill-qwen-32b.json",
                     [(0, 760, 16384, 256, 256, 16), (760, 1130, 24576, 160, 160, 32)]),
    "or1_math_7b.yaml": ("deepseek-r1-distill-qwen-7b.json",
                         [(0, 740, 8192, 256, 128, 16), (740, 1740, 16384, 256, 128, 16),
                          (1740, 2080, 32768, 256, 128, 16), (2080, 2160, 32768, 128, 64, 64)]),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A directory per base model holding its configs/models JSON as config.json (no weights)."""
    dirs = {}
    for model in {m for m, _ in PAPER.values()}:
        path = tmp_path_factory.mktemp(model.removesuffix(".json"))
        shutil.copy(MODELS / model, path / "config.json")
        dirs[model] = path
    return dirs


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_follows_the_paper(name, model_dirs):
    model, schedule = PAPER[name]
    cfg = load_config(REPO / "configs" / name, [f"model.hf_path={model_dirs[model]}"])
    stages = resolve_stages(cfg)
    assert [(s.first_step, s.end_step, s.max_response_length, s.rollout_prompts,
             s.mini_batch_prompts, s.group_size) for s in stages] == schedule
    assert total_steps(cfg) == schedule[-1][1]
    assert cfg.model.dtype == "bf16" and cfg.model.load_weights
    assert cfg.algo.entropy.enabled and cfg.algo.entropy.target == 0.2
    assert (cfg.algo.entropy.delta, cfg.algo.entropy.coef_max) == (1e-4, 5e-3)  # released scripts
    assert cfg.algo.clip_low == 0.2 and cfg.algo.drop_uniform_groups
    assert cfg.rollout.backend == "sglang" and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.sync.transport == "colocated" and cfg.rollout.placement == "colocated"
    # whole 8-GPU nodes; the engines cover the same GPUs as the trainer ranks
    assert cfg.parallel.world_size % 8 == 0
    assert cfg.rollout.engines * cfg.rollout.engine_tp == cfg.parallel.world_size
    assert cfg.parallel.tensor_parallel <= 8 and cfg.parallel.sequence_parallel


def test_or1_config_command_prints_every_config(model_dirs):
    or1 = Path(sys.executable).with_name("or1")
    for name, (model, schedule) in PAPER.items():
        done = subprocess.run([str(or1), "config", "--config", str(REPO / "configs" / name),
                               f"model.hf_path={model_dirs[model]}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"steps: {schedule[0][1] - schedule[0][0]}" in done.stdout
        assert "backend: sglang" in done.stdout

