"""The SGLang adapter: its command line, the torch pin, and (GPU only) a real SGLang server.

Its HTTP side is `HttpEngine`, which the contract and router tests drive against the CPU
engine (same API); the GPU test runs the contract's core check against real SGLang.
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from or1_megatron.rollout.sglang_adapter import (
    SGLangEngineProcess,
    SGLangVersionError,
    check_sglang_install,
    sglang_version_for_torch,
)
from tests.rollout_testutil import forward_logprobs, load_model, make_tiny_qwen2, run


def test_command_line_carries_every_option_and_passes_extras_through():
    process = SGLangEngineProcess("/models/r1-7b", tp_size=4, mem_fraction_static=0.7,
                                  random_seed=3, base_gpu_id=4, port=31000,
                                  enable_memory_saver=True, check_install=False, python="py",
                                  extra_args=["--attention-backend", "fa3"])
    cmd = process.command()
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::2], cmd[4::2]))
    assert pairs["--model-path"] == "/models/r1-7b" and pairs["--tp-size"] == "4"
    assert pairs["--mem-fraction-static"] == "0.7" and pairs["--port"] == "31000"
    assert pairs["--random-seed"] == "3" and pairs["--base-gpu-id"] == "4"
    assert "--enable-memory-saver" in cmd and "--skip-tokenizer-init" in cmd
    assert cmd[-2:] == ["--attention-backend", "fa3"]
    assert process.client().tp_size == 4 and process.url == "http://127.0.0.1:31000"


def test_sglang_version_follows_torch():
    assert sglang_version_for_torch("2.13.0") == "0.5.21"
    assert sglang_version_for_torch("2.14.1+cu128") == "0.5.22"
    with pytest.raises(SGLangVersionError, match="no SGLang release"):
        sglang_version_for_torch("2.1.0")


def test_install_check_names_the_version_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SGLangVersionError, match=r"sglang==0\.5\.21"):
        check_sglang_install()

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.22")
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["torch==9.9.9", "numpy"])
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    with pytest.raises(SGLangVersionError, match=r"requires torch==9\.9\.9"):
        check_sglang_install()


@pytest.mark.gpu
def test_real_sglang_server_generates_with_forward_pass_logprobs(tmp_path):
    model_dir = make_tiny_qwen2(tmp_path / "model")
    process = SGLangEngineProcess(model_dir, mem_fraction_static=0.2, dtype="float32",
                                  log_dir=tmp_path, start_timeout_s=600)
    process.start()
    try:
        process.wait_ready()

        async def go():
            client = process.client()
            try:
                return await client.generate([[5, 6, 7]], {"max_new_tokens": 8, "temperature": 0.0,
                                                           "ignore_eos": True})
            finally:
                await client.close()

        [result] = run(go())
        expected = forward_logprobs(load_model(model_dir), [5, 6, 7], result.output_ids)
        torch.testing.assert_close(torch.tensor(result.output_logprobs), expected, atol=1e-3, rtol=0)
    finally:
        process.kill()


@pytest.mark.sglang_cpu
def test_sglangs_own_server_args_parse_our_command_line():
    """What the Ray engine host launches (TP 2, GPUs from index 0 of its own visible list, the
    memory saver for colocated release/resume), read back by SGLang's own ServerArgs parser."""
    server_args = pytest.importorskip("sglang.srt.server_args")
    import argparse

    process = SGLangEngineProcess("/models/r1-7b", tp_size=2, mem_fraction_static=0.6,
                                  random_seed=11, base_gpu_id=0, port=31001,
                                  enable_memory_saver=True, weight_version="v3", check_install=False,
                                  env={"CUDA_VISIBLE_DEVICES": "5,6"},
                                  extra_args=["--attention-backend", "torch_native"])
    cmd = process.command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    parsed = parser.parse_args(cmd[3:])
    assert (parsed.model_path, parsed.tp_size, parsed.base_gpu_id) == ("/models/r1-7b", 2, 0)
    assert (parsed.port, parsed.random_seed, parsed.mem_fraction_static) == (31001, 11, 0.6)
    assert parsed.enable_memory_saver and parsed.skip_tokenizer_init
    assert parsed.weight_version == "v3" and parsed.attention_backend == "torch_native"
    assert process.env["CUDA_VISIBLE_DEVICES"] == "5,6"
