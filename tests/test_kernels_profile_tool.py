"""tools/profile_kernels.py runs end to end on a tiny problem and prints its summary line.

Only the format and the errors are checked: the ratios are measurements, not test outcomes.
"""
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_profile_tool_prints_ratios_and_small_errors():
    cmd = [
        sys.executable, str(REPO_ROOT / "tools" / "profile_kernels.py"), "--tokens", "40", "--hidden", "16",
        "--vocab", "256", "--valid-vocab", "250", "--temperature", "0.9", "--tp", "2", "--repeats", "1",
        "--compare", "liger,cce",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("fused peak_mem=") for line in lines)
    assert any(line.startswith("naive peak_mem=") for line in lines)
    # the anchors are Triton-on-GPU kernels: on this CPU each is reported and skipped, not fatal
    assert "liger skipped: needs a CUDA device" in proc.stdout and "cce   skipped: needs a CUDA device" in proc.stdout
    fractions = [float(m) for m in re.findall(r"roofline_fraction=([\d.e+-]+)", proc.stdout)]
    assert len(fractions) == 2 and all(0 < f < 1.5 for f in fractions), proc.stdout
    match = re.fullmatch(r"memory_ratio=([\d.]+) time_ratio=([\d.]+) max_err=([\d.e+-]+)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(3)) < 1e-4


def test_unknown_comparison_kernel_is_named():
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "profile_kernels.py"), "--tokens", "4", "--hidden", "4",
           "--vocab", "8", "--compare", "liger,flash"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--compare: unknown kernel(s) flash; known: liger, cce" in proc.stderr
