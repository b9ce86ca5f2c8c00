"""tools/plan.py: memory per GPU of the paper's layouts against hand computation, the step-time
formulas, and the advice it gives when a layout does not fit (re-planned to check it fits)."""
import math
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from or1_megatron.convert.hf_config import load_arch
from or1_megatron.plan.command import build_plan, main
from or1_megatron.plan.engine_memory import engine_memory, kv_bytes_per_token
from or1_megatron.plan.hardware import GPUS, Efficiency
from or1_megatron.plan.layout import Layout
from or1_megatron.plan.step_time import Workload, step_time

REPO = Path(__file__).resolve().parents[1]
MODEL_7B = REPO / "configs" / "models" / "deepseek-r1-distill-qwen-7b.json"
MODEL_32B = REPO / "configs" / "models" / "deepseek-r1-distill-qwen-32b.json"
H100 = GPUS["h100-80gb"]
GIB = 1024**3
V = 152064
P7, P32 = 7_615_616_512, 32_763_876_352


def layer_params(h, kv_dim, f):
    # q, k, v weights + biases, o, two norms, gate, up, down
    return h * h + h + 2 * (kv_dim * h + kv_dim) + h * h + 2 * h + 3 * h * f


def rank_params(h, kv_dim, f, layers, tp):
    """One TP rank at PP1: matrices, biases and the vocabulary split by TP; norms whole."""
    layer = layer_params(h, kv_dim, f)
    return layers * ((layer - 2 * h) // tp + 2 * h) + 2 * V * h // tp + h


def plan_for(config: str, model: Path, nodes: int, *overrides: str):
    return build_plan(str(REPO / "configs" / config), [f"model.hf_path={model}", *overrides], H100,
                      nodes, Efficiency(), Workload())


def test_parameter_counts_by_hand():
    assert rank_params(3584, 512, 18944, 28, 1) == P7
    assert rank_params(5120, 1024, 27648, 64, 1) == P32


def test_engine_memory_by_hand():
    static = int(0.5 * 81559 * 2**20)
    e7 = engine_memory(load_arch(MODEL_7B), P7, engine_tp=2, mem_fraction=0.5, gpu_memory=H100.memory_bytes)
    assert (e7.weights, e7.kv_bytes_per_token) == (P7, 2 * 28 * 2 * 128 * 2)  # 2 of 4 KV heads per GPU
    assert e7.kv_tokens == (static - P7) // 28672
    e32 = engine_memory(load_arch(MODEL_32B), P32, engine_tp=8, mem_fraction=0.5, gpu_memory=H100.memory_bytes)
    assert (e32.weights, e32.kv_bytes_per_token) == (2 * P32 // 8, 2 * 64 * 1 * 128 * 2)
    assert e32.kv_tokens == (static - 2 * P32 // 8) // 32768
    # past the KV head count, heads are replicated, not split further
    assert kv_bytes_per_token(load_arch(MODEL_7B), 8) == 2 * 28 * 1 * 128 * 2


@pytest.mark.parametrize(
    "config, model, nodes, dims, tp, dp, tokens",
    [("or1_7b.yaml", MODEL_7B, 4, (3584, 512, 18944, 28), 2, 16, 34816),
     ("or1_32b.yaml", MODEL_32B, 8, (5120, 1024, 27648, 64), 8, 8, 26624)],
)
def test_paper_layouts_fit_with_hand_computed_memory(config, model, nodes, dims, tp, dp, tokens):
    h, kv, f, layers = dims
    plan, suggestion, notes = plan_for(config, model, nodes)
    assert plan.fits and suggestion is None and notes == []
    p = rank_params(h, kv, f, layers, tp)
    state = 2 * p + 4 * p + int(12 / dp * p)
    heads = h // 128
    per_layer = (2 * (4 * h + 3 * f) + 8 + 2 * ((h + kv) + (h + 2 * kv) + h) + 4 * heads) * tokens // tp
    with_recompute = 2 * h * tokens // tp * layers + per_layer
    logits = 6 * 2**25 + 4 * tokens * h + 2 * V // tp * h
    overhead = 4 * GIB
    for sp in plan.stages:
        m = sp.policy
        assert (m.params, m.weights, m.grads, m.optimizer) == (p, 2 * p, 4 * p, int(12 / dp * p))
        assert m.activations == with_recompute and sp.activations_by_mode["none"] == per_layer * layers
        assert m.logits == logits
        assert sp.train_peak == state + with_recompute + logits + overhead
        assert sp.rollout_peak == state + int(0.5 * H100.memory_bytes) + overhead
        assert sp.rollout_peak <= H100.memory_bytes and sp.train_peak <= H100.memory_bytes


def test_step_time_follows_the_printed_formulas():
    arch = load_arch(MODEL_7B)
    plan, _, _ = plan_for("or1_7b.yaml", MODEL_7B, 4)
    sp = plan.stages[0]  # 256 prompts x 16, 16K responses
    t, peak, eff = sp.time, 989.4e12, Efficiency()
    h, layers = 3584, 28
    matmul = P7 - V * h
    prompt, response = 512, 0.5 * 16384
    tokens = 4096 * (prompt + response)
    fwd = tokens * (2 * matmul + 4 * layers * h * (prompt + response) / 2)
    tp_bytes = layers * (tokens / 16) * h * 2 * (1 / 2)  # per collective per layer, per GPU
    nvlink = 450e9 * 0.7
    assert t.tokens == tokens
    assert t.logprob == pytest.approx(fwd / (32 * peak * 0.4) + 4 * tp_bytes / nvlink)
    dp_sync = sp.policy.params * 6 * 15 / 16 / (50e9 * 0.7)  # DP16 spans nodes: IB
    assert t.train == pytest.approx(4 * fwd / (32 * peak * 0.35) + 12 * tp_bytes / nvlink + dp_sync)
    assert t.sync == pytest.approx(1.0 + 2 * P7 / 2 / nvlink + 2 * P7 / 2 / nvlink)
    kv_tokens = sp.engine.kv_tokens
    concurrency = min(256, kv_tokens // int(prompt + response))
    steps = max(16384, math.ceil(256 * response / concurrency))
    per_step = ((P7 + concurrency * (prompt + response / 2) * 28672) / (3350e9 * 0.6)
                + 2 * layers * 10e-6)
    prefill = 256 * prompt * (2 * matmul + 4 * layers * h * prompt / 2) / (2 * peak * 0.5)
    assert (t.decode_concurrency, t.decode_steps) == (concurrency, steps)
    assert t.rollout == pytest.approx(prefill + steps * per_step)
    assert t.total == pytest.approx(t.rollout + t.logprob + t.train + t.sync)
    # with a pipeline, each flush of m micro-batches pays the 1F1B bubble (m + pp - 1) / m
    piped = step_time(arch, replace(plan.layout, pipeline_parallel=2), sp.stage, H100, eff, Workload(),
                      sp.engine, P7, sp.policy.params)
    micro_batches = tokens / 8 / 34816  # DP8 at TP2 x PP2
    assert piped.logprob == pytest.approx(fwd / (32 * peak * 0.4) * (micro_batches + 1) / micro_batches
                                          + 4 * tp_bytes / nvlink)


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().out


def _fix(out: str) -> tuple[list[str], list[str]]:
    """The `Fits with:` advice split into (--nodes args, overrides)."""
    advice = shlex.split(out.split("Fits with:", 1)[1].splitlines()[0])
    nodes = advice[:2] if advice[:1] == ["--nodes"] else []
    return nodes, advice[len(nodes):]


def test_too_small_layout_is_explained_and_the_advice_fits(capsys):
    base = ["--config", str(REPO / "configs" / "or1_32b.yaml"), "--gpu", "h100-80gb",
            f"model.hf_path={MODEL_32B}"]
    code, out = _run(capsys, base + ["--nodes", "8", "parallel.tensor_parallel=2", "model.recompute=none"])
    assert code == 1
    assert "DOES NOT FIT: training needs" in out and "with recompute none" in out
    assert "DOES NOT FIT: rollout needs" in out
    nodes, fix = _fix(out)
    assert nodes == [] and fix  # larger TP or recompute fits on the same 8 nodes
    code, out = _run(capsys, base + ["--nodes", "8", "parallel.tensor_parallel=2", "model.recompute=none", *fix])
    assert code == 0 and "FITS: peak" in out

    # one node cannot hold 32B's policy state next to the engines: the advice adds nodes
    code, out = _run(capsys, base + ["--nodes", "1"])
    assert code == 1 and "planning 1 node(s)" in out
    nodes, fix = _fix(out)
    assert nodes[0] == "--nodes" and int(nodes[1]) > 1
    code, out = _run(capsys, base + nodes + fix)
    assert code == 0 and "FITS: peak" in out


def test_bad_input_exits_2(capsys):
    base = ["--config", str(REPO / "configs" / "or1_7b.yaml"), "--nodes", "4"]
    assert main(base + ["parallel.tensor_parallel=3"]) == 2  # not a divisor of 28 heads
    assert "parallel.world_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--efficiency", "train_mfu=fast"])
    assert "not a number" in capsys.readouterr().err


def test_tools_plan_script_prints_the_breakdown():
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), "--config",
                           str(REPO / "configs" / "or1_math_7b.yaml"), "--nodes", "4", "--gpu", "h100-80gb",
                           f"model.hf_path={MODEL_7B}", "--efficiency", "train_mfu=0.3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "train_mfu=0.3," in out and "IB 50 GB/s" in out
    for phase in ("rollout", "logprob", "train", "sync"):
        assert f"    {phase} " in out
    assert out.count("stages[") == 4 and "N_SGD 2" in out and "FITS" in out


def _layout(tp: int) -> Layout:
    return Layout(tensor_parallel=tp, pipeline_parallel=1, context_parallel=1, world_size=tp,
                  sequence_parallel=tp > 1, distributed_optimizer=True, recompute="full",
                  micro_batch_tokens=4096, placement="colocated", engines=1, engine_tp=1,
                  mem_fraction=0.5, transport="colocated")


def test_train_mfu_comes_from_a_measurement_on_that_gpu_else_is_called_an_assumption():
    from or1_megatron.plan.calibration import MEASURED
    from or1_megatron.plan.command import calibrated_efficiency

    largest_on_h200 = max((m for m in MEASURED if m.gpu == "h200-141gb"), key=lambda m: m.params)
    eff, note = calibrated_efficiency("h200-141gb", [])
    assert eff.train_mfu == largest_on_h200.mfu
    assert note.startswith("train_mfu measured by tools/bench_policy.py: qwen2.5-1.5b on h200-141gb")
    eff, note = calibrated_efficiency("h100-80gb", [])
    assert eff.train_mfu == Efficiency().train_mfu and "is an assumption: nothing measured on h100-80gb" in note
    eff, note = calibrated_efficiency("h200-141gb", ["train_mfu=0.3"])
    assert eff.train_mfu == 0.3 and note == "train_mfu given on the command line"


def test_the_plan_prints_where_train_mfu_came_from(capsys):
    code, out = _run(capsys, ["--config", str(REPO / "configs" / "or1_7b.yaml"), "--nodes", "4",
                              "--gpu", "h200-141gb", f"model.hf_path={MODEL_7B}"])
    assert "note: train_mfu measured by tools/bench_policy.py: qwen2.5-1.5b on h200-141gb" in out
    assert "train_mfu=0.131," in out
