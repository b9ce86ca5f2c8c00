"""Setup without root: scripts/install_system_deps.sh says what is missing and what that skips,
then lets the setup go on (the CPU demo needs none of it); root installs what is missing."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_system_deps.sh"


def _run_as_non_root_without_packages(tmp_path, **env):
    """The script with a PATH where none of the packages' commands exist and `id -u` is 1000."""
    fake_id = tmp_path / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    return subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path), **env})


def test_a_user_without_root_is_told_what_is_skipped_and_setup_goes_on(tmp_path):
    proc = _run_as_non_root_without_packages(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not root, so not installing:" in proc.stderr
    for package in ("bubblewrap", "slurmctld", "slurmd", "slurm-client", "munge"):
        assert package in proc.stderr
    assert "code rewards run in the rlimits fallback" in proc.stderr
    assert "the Slurm cluster tests are skipped" in proc.stderr
    assert "sudo apt-get install -y" in proc.stderr


def test_missing_packages_can_be_made_an_error(tmp_path):
    proc = _run_as_non_root_without_packages(tmp_path, OR1_REQUIRE_SYSTEM_DEPS="1")
    assert proc.returncode == 1
    assert "not root, so not installing:" in proc.stderr
