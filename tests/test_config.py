"""The run config: YAML + overrides onto the typed schema, and errors that name key and file."""
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from or1_megatron.config import load_config, save_resolved_config
from or1_megatron.errors import ConfigError
from or1_megatron.tiny_model import make_tiny_qwen2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    # 4 heads, 2 KV heads, 2 layers
    return make_tiny_qwen2(tmp_path_factory.mktemp("hf"))


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = """
model: {{hf_path: {hf}, dtype: fp32}}
parallel: {{tensor_parallel: 2, pipeline_parallel: 1, world_size: 4}}
batch: {{rollout_prompts: 8, mini_batch_prompts: 4, group_size: 2, micro_batch_tokens: 256,
        max_prompt_length: 64, max_response_length: 128}}
"""


def test_yaml_and_overrides_resolve(tmp_path, hf_dir):
    path = write_yaml(tmp_path, BASE.format(hf=hf_dir))
    cfg = load_config(path, ["optim.lr=2e-6", "parallel.sequence_parallel=true"])
    assert cfg.optim.lr == 2e-6
    assert cfg.parallel.sequence_parallel is True
    assert cfg.data_parallel == 2
    saved = save_resolved_config(cfg, tmp_path / "run")
    assert load_config(saved) == cfg  # the saved file reproduces the run exactly


def test_recompute_switch_of_older_configs_still_loads(tmp_path, hf_dir):
    # model.recompute was true/false until 2026-12; saved run configs still say so.
    path = write_yaml(tmp_path, BASE.format(hf=hf_dir).replace("dtype: fp32}", "dtype: fp32, recompute: true}"))
    assert load_config(path).model.recompute == "full"
    assert load_config(path, ["model.recompute=false"]).model.recompute == "none"
    assert load_config(path, ["model.recompute=selective"]).model.recompute == "selective"


@pytest.mark.parametrize(
    "yaml_extra, overrides, message",
    [
        ("optim: {lrr: 1.0}", [], "optim.lrr"),
        ("optim: {lr: fast}", [], "optim.lr"),
        ("", ["parallel.tensor_paralel=2"], "parallel.tensor_paralel"),
        ("", ["optim.lr"], "key=value"),
        ("", ["parallel.tensor_parallel=3", "parallel.world_size=3"], "num_attention_heads=4"),
        ("", ["parallel.tensor_parallel=4"], "num_key_value_heads=2"),
        ("", ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"], "num_hidden_layers=2"),
        ("", ["parallel.world_size=3"], "parallel.world_size"),
        ("", ["batch.mini_batch_prompts=3"], "batch.mini_batch_prompts"),
        ("", ["batch.micro_batch_tokens=100"], "batch.micro_batch_tokens"),
        ("", ["model.dtype=fp16"], "model.dtype"),
        ("", ["model.recompute=partial"], "model.recompute: 'partial' is not one of ('none', 'selective', 'full')"),
        ("", ["parallel.tensor_parallel=1", "parallel.sequence_parallel=true"], "sequence_parallel"),
        ("", ["batch.max_response_length=1000", "batch.micro_batch_tokens=2048"], "max_position_embeddings"),
        ("", ["model.hf_path=/nonexistent"], "model.hf_path"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, hf_dir, yaml_extra, overrides, message):
    path = write_yaml(tmp_path, BASE.format(hf=hf_dir) + yaml_extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    text = str(err.value)
    assert message in text
    # The error says where the bad value came from: the YAML file or the override.
    assert str(path) in text or "command line" in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    bad = write_yaml(tmp_path, "model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_unsupported_architecture_is_refused_by_name(tmp_path, hf_dir):
    conf = OmegaConf.load(hf_dir / "config.json")
    conf.architectures = ["LlamaForCausalLM"]
    other = tmp_path / "llama"
    other.mkdir()
    import json

    (other / "config.json").write_text(json.dumps(OmegaConf.to_container(conf)))
    path = write_yaml(tmp_path, BASE.format(hf=other))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        load_config(path)


def test_or1_config_command(tmp_path, hf_dir):
    path = write_yaml(tmp_path, BASE.format(hf=hf_dir))
    ok = subprocess.run([sys.executable, "-m", "or1_megatron.cli", "config", "--config", str(path),
                         "optim.lr=3e-6"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "lr: 3.0e-06" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "or1_megatron.cli", "config", "--config", str(path),
                          "parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "parallel.pipeline_parallel" in bad.stderr and str(path) in bad.stderr


STAGES = """
stages:
  - {name: 16k, steps: 3}
  - {name: 32k, steps: 2, max_response_length: 160, rollout_prompts: 4, mini_batch_prompts: 2, group_size: 4}
"""


def test_stages_inherit_batch_sizes_and_number_their_steps(tmp_path, hf_dir):
    from or1_megatron.config.stages import resolve_stages, stage_at, total_steps

    cfg = load_config(write_yaml(tmp_path, BASE.format(hf=hf_dir) + STAGES))
    first, second = resolve_stages(cfg)
    assert (first.first_step, first.end_step, first.rollout_prompts, first.sgd_steps) == (0, 3, 8, 2)
    assert (second.first_step, second.end_step, second.max_response_length, second.group_size) == (3, 5, 160, 4)
    assert [stage_at([first, second], s).index for s in range(6)] == [0, 0, 0, 1, 1, 1]
    assert total_steps(cfg) == 5
    assert total_steps(load_config(write_yaml(tmp_path, BASE.format(hf=hf_dir) + STAGES),
                                   ["run.max_steps=4"])) == 4


@pytest.mark.parametrize("overrides,message", [
    (["stages.1.mini_batch_prompts=3"], r"stages\[1\]\.mini_batch_prompts: 3 does not divide rollout_prompts=4"),
    (["stages.0.steps=0"], r"stages\[0\]\.steps: must be >= 1"),
    (["stages.1.max_response_length=400"], r"batch\.micro_batch_tokens: 256 cannot hold .*464 tokens \(stages\[1\] \(32k\)\)"),
    (["rollout.backend=vllm"], r"rollout\.backend: 'vllm' is not one of"),
    (["algo.entropy.coef_min=0.5", "algo.entropy.coef_max=0.1"], r"algo\.entropy\.coef_max"),
    (["data.eval_every=5"], r"data\.eval_files: data\.eval_every=5 but there is nothing to evaluate"),
    (["checkpoint.hf_every=-1"], r"checkpoint\.hf_every: must be >= 0"),
    (["checkpoint.hf_keep=0"], r"checkpoint\.hf_keep: must be >= 1"),
    (["algo.mode=one_step_off"], r"algo\.mode: one_step_off overlaps rollout with training: it needs rollout\.placement=disaggregated"),
    (["algo.mode=async"], r"algo\.mode: .async. is not one of"),
    (["algo.is_correction=is"], r"algo\.is_correction: .is. is not one of"),
    (["algo.is_cap=0.5"], r"algo\.is_cap: must be >= 1"),
    # what cannot run on GPUs yet, or at all, refused before anything starts
    (["parallel.context_parallel=2"], r"parallel\.context_parallel: 2 is not supported yet"),
    (["rollout.backend=torch", "rollout.engine_tp=2"], r"rollout\.engine_tp: the torch engine runs on one GPU"),
    (["rollout.engine_tp=3"], r"rollout\.engine_tp: colocated engines .* must divide"),
    (["rollout.backend=sglang", "sync.transport=distributed"], r"sync\.transport: distributed \(NCCL\) with colocated"),
    (["sync.verify_tolerance=-1"], r"sync\.verify_tolerance: must be >= 0"),
    (["rewards.math.boxed=first"], r"rewards\.math\.boxed: 'first' is not one of"),
    (["rewards.math.compat=verl"], r"rewards\.math\.compat: 'verl' is not one of"),
])
def test_bad_training_sections_name_the_key(tmp_path, hf_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_yaml(tmp_path, BASE.format(hf=hf_dir) + STAGES), overrides)
