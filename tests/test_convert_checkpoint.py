"""HF <-> Megatron conversion: bit-exact round trips at every layout, named errors, dry runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from or1_megatron.convert.checkpoint_tool import Layout, hf_to_mcore, mcore_to_hf
from or1_megatron.convert.safetensors_io import SafetensorsReader
from or1_megatron.distributed.fork_launcher import run_forked
from or1_megatron.errors import CheckpointError, ModelConfigError
from or1_megatron.policy.worker import PolicyWorker
from or1_megatron.tiny_model import make_tiny_qwen2
from or1_megatron.policy.oracle import transformers_oracle
from tests.policy_support import policy_config, random_sequences

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "models"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = make_tiny_qwen2(tmp_path_factory.mktemp("src") / "hf", num_layers=4)
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return out


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    reader = SafetensorsReader(directory)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(hf_dir, tmp_path, tp, pp):
    mcore = tmp_path / "mcore"
    hf_to_mcore(hf_dir, mcore, Layout(tp, pp, "fp32"))
    back = tmp_path / "back"
    # export at a different layout than the one converted with: the checkpoint is layout-free
    mcore_to_hf(mcore, back, Layout(pp, tp, "fp32"), max_shard_gb=0.0001)
    original, restored = read_all(hf_dir), read_all(back)
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1  # sharded output with an index
    src_cfg, out_cfg = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    assert {k: v for k, v in out_cfg.items() if k not in ("torch_dtype", "dtype")} == \
        {k: v for k, v in src_cfg.items() if k not in ("torch_dtype", "dtype")}
    assert (back / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()


def rank_score(rank, world, hf_dir, mcore, seqs):
    config = policy_config(hf_dir, 2, 2, world, **{"model.megatron_checkpoint": str(mcore)})
    results = PolicyWorker(config).compute_logprobs(seqs)
    return results and [r.logprob for r in results]


def test_converted_checkpoint_scores_like_transformers_at_tp2_pp2(hf_dir, tmp_path):
    mcore = tmp_path / "mcore"
    hf_to_mcore(hf_dir, mcore, Layout(1, 1, "fp32"))
    seqs = random_sequences(300, (9, 14, 5))
    scores = run_forked(rank_score, 4, hf_dir, mcore, seqs)[-1]
    for got, expected in zip(scores, transformers_oracle(hf_dir, seqs), strict=True):
        torch.testing.assert_close(got.double(), expected["logprob"], atol=2e-5, rtol=1e-5)


def test_hf_output_loads_in_transformers(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    mcore, back = tmp_path / "mcore", tmp_path / "back"
    hf_to_mcore(hf_dir, mcore, Layout(2, 1, "bf16"))
    mcore_to_hf(mcore, back, Layout(1, 1, "bf16"))
    model = AutoModelForCausalLM.from_pretrained(back)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(10000.0)
    assert next(model.parameters()).dtype == torch.bfloat16


def broken_copy(hf_dir: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}), "unexpected tensors: model.layers.9.extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(65)}), r"model.norm.weight has shape \(65,\), expected \(64,\)"),
])
def test_bad_sources_are_named_and_nothing_is_written(hf_dir, tmp_path, edit, message):
    src = broken_copy(hf_dir, tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        hf_to_mcore(src, out, Layout(1, 1, "fp32"))
    assert not out.exists()


def test_unsupported_architecture_and_bad_layout(hf_dir, tmp_path):
    src = broken_copy(hf_dir, tmp_path, lambda t: None)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"])))
    with pytest.raises(ModelConfigError, match="MistralForCausalLM"):
        hf_to_mcore(src, tmp_path / "out", Layout(1, 1, "fp32"))
    with pytest.raises(CheckpointError, match="--tp 4 does not divide num_key_value_heads=2"):
        hf_to_mcore(hf_dir, tmp_path / "out", Layout(4, 1, "fp32"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, tp, pp, tensors, params", [
    ("deepseek-r1-distill-qwen-7b.json", 4, 2, 339, "7,615,616,512"),
    ("deepseek-r1-distill-qwen-32b.json", 2, 2, 771, "32,763,876,352"),
])
def test_dry_run_on_real_configs(capsys, model, tp, pp, tensors, params):
    hf_to_mcore(MODELS / model, None, Layout(tp, pp, "bf16"), dry_run=True)
    out = capsys.readouterr().out
    assert f"dry run ok: {tensors} tensors, {params} parameters" in out
    assert "every TP/PP shard shape matches" in out


def test_cli_reports_errors_by_name(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "mcore-to-hf",
         "--mcore-dir", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert f"{tmp_path}: not an or1-megatron checkpoint" in result.stderr
