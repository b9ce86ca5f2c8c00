"""Two Slurm nodes on one machine, each in a network namespace of its own, for multi-node tests.

Layout (all made by this module, all removed at the end, even after a failure):
- a bridge `or1br0` with 10.77.0.254/24 in the host's namespace, where slurmctld and munged run;
- namespaces `or1n1` and `or1n2`, each with a veth into the bridge (10.77.0.1 and 10.77.0.2) and
  a default route through 10.77.0.254 (so Ray's node-address detection picks the veth address;
  the host does not forward, so nothing leaves the bridge), each running a slurmd for the node
  of that name. A job's steps on a node run in that node's namespace, so Ray's head and worker,
  the driver and the policy ranks talk over the veths as they would over a cluster's network.
Process tracking is proctrack/linuxproc, job ids start at FIRST_JOB_ID: the one-node cluster of
slurm_cluster.py may run at the same time, and its cgroup-tracked job ids must not collide.
A node "dies" with `kill_node`: its slurmd and every process in its namespace get SIGKILL.
The fixture skips, with the reason, where namespaces cannot be made (not root, no `ip`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.slurm_cluster import (
    SlurmCluster, _free_port, _start, _wait_for, ensure_installed, munge_key, start_controller, stop_cluster,
)

BRIDGE = "or1br0"
NODES = ("or1n1", "or1n2")
HOST_ADDRESS = "10.77.0.254"
FIRST_JOB_ID = 700000
PARTITION = "or1two"
SLURMD_TIMEOUT_S = 10  # a node whose slurmd stops answering is DOWN after this
# srun listens here (a step's tasks connect back to it): `cut_off_from_head` keeps these open.
SRUN_PORTS = (61440, 61999)


def node_address(node: str) -> str:
    return f"10.77.0.{NODES.index(node) + 1}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = "or1probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _tear_down_network() -> None:
    for node in NODES:
        pids = _ip("netns", "pids", node, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        _ip("netns", "del", node, check=False)
    _ip("link", "del", BRIDGE, check=False)


def _set_up_network() -> None:
    _tear_down_network()  # leftovers of an interrupted session
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for node in NODES:
        host_end = f"{node}h"
        _ip("netns", "add", node)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", node)
        _ip("link", "set", host_end, "master", BRIDGE, "up")
        _ip("-n", node, "addr", "add", f"{node_address(node)}/24", "dev", "eth0")
        _ip("-n", node, "link", "set", "eth0", "up")
        _ip("-n", node, "link", "set", "lo", "up")
        _ip("-n", node, "route", "add", "default", "via", HOST_ADDRESS)


def _write_conf(root: Path, auth_socket: Path, slurmd_port: int) -> Path:
    for sub in ("state", "log", *(f"spool-{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 4)
    cpus = os.cpu_count() or 2
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=or1two",
        # slurmctld runs on this host, reached by the nodes at the bridge's address
        f"SlurmctldHost={socket.gethostname().split('.')[0]}({HOST_ADDRESS})",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={auth_socket}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
        f"FirstJobId={FIRST_JOB_ID}", "MinJobAge=600", "KillWait=5", "InactiveLimit=0",
        f"SlurmdTimeout={SLURMD_TIMEOUT_S}", "JobCompType=jobcomp/none",
        f"SrunPortRange={SRUN_PORTS[0]}-{SRUN_PORTS[1]}",
        "AccountingStorageType=accounting_storage/none",
        *(f"NodeName={n} NodeAddr={node_address(n)} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
          for n in NODES),
        f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


@dataclass
class TwoNodeCluster:
    slurm: SlurmCluster
    slurmds: dict[str, subprocess.Popen]
    setup_s: float
    slurmd_port: int

    def env(self, **extra: str) -> dict[str, str]:
        return self.slurm.env(**extra)

    def node_states(self) -> dict[str, str]:
        out = self.slurm.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def kill_node(self, node: str) -> None:
        """The node dies: its slurmd and every process in its namespace, SIGKILL."""
        self.slurmds[node].kill()
        for pid in _ip("netns", "pids", node, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        self.slurmds[node].wait(timeout=30)
        self.slurm.processes.remove(self.slurmds[node])  # its exit is not a cluster failure


def _slurmd_command(node: str, conf: Path) -> list[str]:
    # nsenter enters only the network namespace: `ip netns exec` would also mount a sysfs of its
    # own, without /sys/fs/cgroup, where slurmd cannot start its cgroup plugin.
    return ["nsenter", f"--net=/run/netns/{node}", "slurmd", "-D", "-N", node, "-f", str(conf)]


@contextlib.contextmanager
def cut_off_from_head(cluster: "TwoNodeCluster", node: str) -> Iterator[None]:
    """`node` cannot open TCP connections to the first node (where the Ray head runs), as with
    a firewall between them, except what Slurm's own steps need: connections to srun's ports
    and slurmd's answers. Policy routing (`ip rule`): the rest has no route to the head."""
    head, table = node_address(NODES[0]), "100"
    first, last = SRUN_PORTS
    rules = [["ipproto", "tcp", "dport", f"{first}-{last}", "lookup", "main", "prio", "100"],
             ["ipproto", "tcp", "sport", str(cluster.slurmd_port), "lookup", "main", "prio", "101"],
             ["to", head, "ipproto", "tcp", "lookup", table, "prio", "102"]]
    _ip("-n", node, "route", "add", "unreachable", head, "table", table)
    try:
        for rule in rules:
            _ip("-n", node, "rule", "add", *rule)
        yield
    finally:
        for rule in rules:
            _ip("-n", node, "rule", "del", *rule, check=False)
        _ip("-n", node, "route", "del", "unreachable", head, "table", table, check=False)


def start_two_node_cluster(root: Path) -> TwoNodeCluster:
    started = time.monotonic()
    key, auth_socket = munge_key(root)
    _set_up_network()
    slurmd_port = _free_port()
    slurm = SlurmCluster(root=root, conf=_write_conf(root, auth_socket, slurmd_port), partition=PARTITION)
    slurmds: dict[str, subprocess.Popen] = {}
    try:
        start_controller(slurm, key, auth_socket)
        for node in NODES:
            slurmds[node] = _start(slurm, _slurmd_command(node, slurm.conf), f"slurmd-{node}")
        cluster = TwoNodeCluster(slurm, slurmds, 0.0, slurmd_port)
        _wait_for(lambda: set(cluster.node_states().values()) == {"idle"}
                  and len(cluster.node_states()) == len(NODES), 60, "both nodes to become idle", slurm)
    except BaseException:
        stop_cluster(slurm)
        _tear_down_network()
        raise
    cluster.setup_s = time.monotonic() - started
    return cluster


def restart_node(cluster: TwoNodeCluster, node: str) -> None:
    """A killed node's slurmd again, and the node back to idle."""
    cluster.slurmds[node] = _start(cluster.slurm, _slurmd_command(node, cluster.slurm.conf),
                                   f"slurmd-{node}")
    cluster.slurm.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
    _wait_for(lambda: cluster.node_states().get(node) == "idle", 60, f"{node} to become idle",
              cluster.slurm)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory) -> TwoNodeCluster:
    reason = ensure_installed() or namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"no two-node cluster: {reason}")
    cluster = start_two_node_cluster(tmp_path_factory.mktemp("slurm2"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster.slurm)
        _tear_down_network()
