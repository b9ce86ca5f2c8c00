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
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("fused peak_mem=") for line in lines)
    assert any(line.startswith("naive peak_mem=") for line in lines)
    match = re.fullmatch(r"memory_ratio=([\d.]+) time_ratio=([\d.]+) max_err=([\d.e+-]+)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(3)) < 1e-4
