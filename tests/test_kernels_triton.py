"""The Triton row kernels on CPU under TRITON_INTERPRET=1, against the same fp64 oracle.

TRITON_INTERPRET must be set before `logprob_triton` defines its kernels, and another test in the
same pytest process may already have imported it without the interpreter. So the cases run in a
fresh subprocess (this file run as a script), which prints one JSON line of errors per case; the
tests below only read that report. Shapes are small and use one large block per row (each
interpreted loop iteration costs milliseconds), except the case that forces several blocks to
test the online rescaling across blocks.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# name: (tokens, hidden, v_local, valid, temperature, chunk, dtype, block_v, tp)
CASES = {
    "fp32_one_block": (37, 16, 101, None, 1.0, 40, "float32", None, 1),
    "fp32_padded_temperature": (29, 16, 101, 90, 0.7, 16, "float32", None, 1),
    "fp32_several_blocks": (13, 16, 101, 97, 1.3, 64, "float32", 32, 1),  # 2 blocks per chunk
    "bf16_vs_naive": (21, 32, 77, None, 1.0, 30, "bfloat16", None, 1),
    "fp32_tp2_padded": (23, 16, 40, 70, 0.8, 8, "float32", None, 2),
}
FP32_TOL = 2e-5


def _run_case(rank, world_size, name):
    """Run one case on this rank; returns {error name: max abs error}."""
    import torch

    from or1_megatron.kernels import fused_logprob_entropy, naive_logprob_entropy
    from or1_megatron.kernels import logprob_triton
    from or1_megatron.kernels.reference import oracle_errors

    tokens, hidden_size, v_local, valid, temperature, chunk, dtype, block_v, _ = CASES[name]
    dtype = getattr(torch, dtype)
    logprob_triton.block_v_override = block_v
    gen = torch.Generator().manual_seed(2)
    full = (torch.randn(v_local * world_size, hidden_size, generator=gen) * 0.5).to(dtype)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, valid or v_local * world_size, (tokens,), generator=gen)
    g_lp, g_ent = torch.randn(tokens, generator=gen), torch.randn(tokens, generator=gen)
    shard = (rank * v_local, (rank + 1) * v_local)
    weight = full[shard[0] : shard[1]].clone().requires_grad_()
    group = torch.distributed.group.WORLD if world_size > 1 else None

    def run(fn, **kwargs):
        lp, ent = fn(hidden, weight, targets, temperature, group, valid, **kwargs)
        gh, gw = torch.autograd.grad((g_lp * lp + g_ent * ent).sum(), (hidden, weight))
        return lp, ent, gh, gw

    lp, ent, gh, gw = run(fused_logprob_entropy, vocab_chunk=chunk, impl="triton")
    errors = oracle_errors(hidden, full, targets, lp, ent, gh, gw, g_lp, g_ent, temperature, valid, shard)
    errors["logprob_above_zero"] = max(0.0, lp.max().item())
    if dtype != torch.float32:
        # bf16 logits are rounded like the naive path's: that is the tight reference.
        naive = run(naive_logprob_entropy)
        errors = {"naive_" + key: (a.double() - b.double()).abs().max().item()
                  for key, a, b in zip(("logprob", "entropy"), (lp, ent), naive)}
        errors.update(oracle_errors(hidden, full, targets, lp, ent, None, None, g_lp, g_ent, temperature, valid))
    return errors


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests with TRITON_INTERPRET=1"
    import torch

    from or1_megatron.distributed.fork_launcher import run_forked

    torch.set_num_threads(1)
    for name, case in CASES.items():
        try:
            if case[-1] == 1:
                per_rank = [_run_case(0, 1, name)]
            else:
                per_rank = run_forked(_run_case, case[-1], name, timeout_s=120)
            errors = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
            print(json.dumps({"case": name, "errors": errors}), flush=True)
        except Exception as exc:  # report and go on: one broken case must not hide the others
            print(json.dumps({"case": name, "failure": f"{type(exc).__name__}: {exc}"}), flush=True)


@pytest.fixture(scope="module")
def interpreted_report():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the CPU torch wheel does not bring it): pip install triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    report = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            report[entry["case"]] = entry
    if proc.returncode != 0 and not report:
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return report


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_oracle(interpreted_report, name):
    entry = interpreted_report.get(name)
    assert entry is not None, f"case {name} produced no report"
    assert "failure" not in entry, entry["failure"]
    errors = entry["errors"]
    if name.startswith("bf16"):
        assert errors["naive_logprob"] < 1e-5 and errors["naive_entropy"] < 1e-5, errors
        assert errors["logprob"] < 0.1 and errors["entropy"] < 0.05, errors
    else:
        assert max(errors.values()) < FP32_TOL, errors
        assert errors["logprob_above_zero"] == 0.0


if __name__ == "__main__":
    _worker()
