"""A real one-node Slurm cluster for tests: Debian's slurmctld, slurmd and munge on localhost.

Everything the cluster needs lives under one private directory (slurm.conf, munge key and
socket, state, spool, logs), so the machine's own /etc/slurm and any running munged are left
alone; clients find the cluster through SLURM_CONF. The packages come from
scripts/install_system_deps.sh (which CI runs as root); when they are missing the fixture runs it
itself, and skips with the reason when it cannot (not root, no apt-get). Teardown stops only the
daemons this module started.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from or1_megatron.cluster.submit import job_info

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_system_deps.sh"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
PARTITION = "or1test"


def _missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def ensure_installed() -> str | None:
    """Install the Slurm packages when absent; the reason the cluster cannot run, or None."""
    if os.geteuid() != 0:
        # slurmctld and slurmd of this test cluster drop to SlurmUser and set groups: root only.
        return ("the test cluster's slurmctld and slurmd need root" if not _missing_binaries() else
                f"Slurm is not installed ({', '.join(_missing_binaries())} missing) and installing needs root")
    if not _missing_binaries():
        return None
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is unavailable to install it"
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return f"{INSTALL_SCRIPT.name} failed: {done.stderr.strip()[-500:]}"
    missing = _missing_binaries()
    return f"still missing after install: {', '.join(missing)}" if missing else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _node_line() -> str:
    """`slurmd -C`'s description of this machine: the real hostname, CPUs and memory."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


def write_slurm_conf(root: Path, auth_socket: Path) -> Path:
    node_line = _node_line()
    node = node_line.split()[0].split("=", 1)[1]
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # slurmd reads cgroup.conf from slurm.conf's directory
    (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
                                      "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n")
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=or1test",
        f"SlurmctldHost={node}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={auth_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        # cgroup tracking, as on production clusters: a job's processes cannot escape it by
        # starting sessions of their own (Ray's daemons, engine servers), so none outlive it.
        "ProctrackType=proctrack/cgroup",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobRequeue=1",
        # Finished jobs stay visible to `scontrol show job` for the tests' assertions.
        "MinJobAge=600",
        "KillWait=5",
        "InactiveLimit=0",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "SlurmdParameters=config_overrides",
        node_line,
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


@dataclass
class SlurmCluster:
    """A running cluster and the environment its clients need."""

    root: Path
    conf: Path
    partition: str = PARTITION
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, RunTime, Restarts, ...)."""
        return job_info(job_id, env=self.env())

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts)


def _start(cluster: SlurmCluster, args: list[str], name: str) -> subprocess.Popen:
    log = open(cluster.root / "log" / f"{name}.stdout", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=cluster.env(),
                            start_new_session=True)
    cluster.processes.append(proc)
    return proc


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in cluster.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while waiting for "
                                   f"{what}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.3)


def munge_key(root: Path) -> tuple[Path, Path]:
    """A fresh munge key under `root` (made private) and where munged's socket will be."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses a socket or key directory writable by others
    munge = root / "munge"
    munge.mkdir(mode=0o700, exist_ok=True)
    key, auth_socket = munge / "munge.key", munge / "munge.socket"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
    return key, auth_socket


def start_controller(cluster: SlurmCluster, key: Path, auth_socket: Path) -> None:
    """munged with `key`, then slurmctld, each waited for until it answers."""
    munge = key.parent
    _start(cluster, ["munged", "--foreground", "--force", f"--socket={auth_socket}",
                     f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={cluster.root / 'log' / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"], "munged")
    _wait_for(auth_socket.exists, 20, "munged's socket", cluster)
    _start(cluster, ["slurmctld", "-D", "-c", "-i", "-f", str(cluster.conf)], "slurmctld")
    _wait_for(lambda: cluster.run("scontrol", "ping").returncode == 0, 60, "slurmctld", cluster)


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd in the foreground (held as child processes)."""
    key, auth_socket = munge_key(root)
    conf = write_slurm_conf(root, auth_socket)
    cluster = SlurmCluster(root=root, conf=conf)
    try:
        start_controller(cluster, key, auth_socket)
        _start(cluster, ["slurmd", "-D", "-f", str(conf)], "slurmd")
        _wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60,
                  "the node to become idle", cluster)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's leftover jobs, then stop the daemons this module started; nothing else."""
    if cluster.processes and cluster.processes[-1].poll() is None:
        cluster.run("scancel", "--partition", cluster.partition)
        deadline = time.monotonic() + 30
        while cluster.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    for proc in reversed(cluster.processes):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
    cluster.processes.clear()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    reason = ensure_installed()
    if reason is not None:
        pytest.skip(f"no Slurm cluster: {reason}")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
