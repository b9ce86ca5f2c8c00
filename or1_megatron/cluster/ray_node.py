"""One Ray node's life inside a Slurm job step, and the bounded waits around it.

The sbatch script of `cluster.slurm_script` runs, with the submitting environment's python:

  head     `ray start --head --block` (GCS on a free port, its address written to the node-local
           temp dir) in a process group of its own;
  worker   the same for another node, once the head's GCS port accepts connections;
  address  waits for the head's address file and prints `ip:port`;
  wait     waits until the cluster has N alive nodes;
  joined   prints the addresses of the nodes alive now (for the message when a node step fails).

`ray start --block` leaves Ray's daemons (GCS, raylet, workers) running when it is killed, and
they would hold the node after the job; so head/worker end the whole process group when their
step is signalled or when `ray start` exits on its own, and an unrequested exit is a failure.
Every wait has a timeout, so a node that never comes fails the job instead of hanging it.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# ray writes the GCS address of the cluster it started here, inside --temp-dir
ADDRESS_FILE = "ray_current_cluster"


def node_name() -> str:
    """Slurm's name of this node (network namespaces and containers share a hostname)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def ray_executable() -> str:
    """The `ray` of this interpreter's environment (the one `or1` runs in)."""
    return str(Path(sys.executable).with_name("ray"))


def node_resources(num_cpus: int, num_gpus: int) -> list[str]:
    # 0 CPUs means "what Slurm gave this step": Ray would otherwise count the whole machine.
    cpus = num_cpus or int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    return [f"--num-cpus={cpus}", f"--num-gpus={num_gpus}"]


def _kill_rest_of_group(group: int) -> None:
    """SIGKILL every process of `group` but this one."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_node(command: list[str], grace_s: float = 5.0) -> int:
    """Run `ray start ... --block` until signalled (exit 0) or until it dies (exit non-zero).

    Ray's daemons stay in this process's group, where Slurm's process tracking (cgroup or pgid)
    finds them even if this process is killed. On SIGTERM/SIGINT the group gets SIGTERM and,
    `grace_s` later, the rest of it SIGKILL (Ray's own handler would drain the node for up to
    30 s; the job is ending, nothing needs draining). The handler only signals: waiting happens
    in the loop (a wait inside a handler could deadlock on Popen's lock held by the interrupted wait).
    """
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)  # lead a group, so signalling it never reaches whoever started us
    group = os.getpgid(0)
    proc = subprocess.Popen(command)
    stopping = False
    requested_at: list[float] = []

    def on_signal(signum, _frame) -> None:
        nonlocal stopping
        if stopping:  # includes the SIGTERM this process sends its own group
            return
        stopping = True
        requested_at.append(time.monotonic())
        print(f"ray_node: signal {signum}: stopping Ray on {node_name()}", flush=True)
        os.killpg(group, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            code = proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if requested_at and time.monotonic() - requested_at[0] > grace_s:
                _kill_rest_of_group(group)
    if not requested_at:
        print(f"ray_node: `ray start` exited with {code} on {node_name()}; ending its processes",
              file=sys.stderr, flush=True)
        stopping = True
        os.killpg(group, signal.SIGTERM)
        time.sleep(min(grace_s, 5.0))
    _kill_rest_of_group(group)  # whatever of Ray's daemons outlived `ray start`
    return 0 if requested_at else (code or 1)


def wait_for_port(address: str, timeout_s: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray head at {address} did not accept connections within "
                                   f"{timeout_s:.0f} s ({exc})") from None
            time.sleep(1)


def read_address(temp_dir: str, timeout_s: float) -> str:
    path = Path(temp_dir) / ADDRESS_FILE
    deadline = time.monotonic() + timeout_s
    while not (path.is_file() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray head wrote no address to {path} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return path.read_text().strip()


def _alive_addresses() -> list[str]:
    import ray

    return sorted(node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive"))


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> int:
    """Alive nodes once there are `nodes` of them; TimeoutError naming the count otherwise."""
    import ray  # only these subcommands need the package itself

    deadline = time.monotonic() + timeout_s
    wait_for_port(address, timeout_s)  # ray.init retries an absent GCS for minutes
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        while True:
            joined = _alive_addresses()
            if len(joined) >= nodes:
                return len(joined)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(joined)} of {nodes} Ray nodes joined within {timeout_s:.0f} s "
                                   f"(joined: {', '.join(joined) or 'none'})")
            time.sleep(1)
    finally:
        ray.shutdown()


def joined_nodes(address: str, timeout_s: float) -> list[str]:
    """The addresses of the nodes alive in the cluster at `address` now."""
    import ray

    wait_for_port(address, timeout_s)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return _alive_addresses()
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m or1_megatron.cluster.ray_node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    head = sub.add_parser("head")
    head.add_argument("--temp-dir", required=True, help="node-local directory for Ray's sockets and logs")
    worker = sub.add_parser("worker")
    worker.add_argument("--address", required=True)
    worker.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the head")
    for p in (head, worker):
        p.add_argument("--num-cpus", type=int, default=0, help="0: the CPUs Slurm gave the step")
        p.add_argument("--num-gpus", type=int, default=0)
    address = sub.add_parser("address")
    address.add_argument("--temp-dir", required=True)
    address.add_argument("--timeout", type=float, default=300.0)
    wait = sub.add_parser("wait")
    wait.add_argument("--address", required=True)
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=300.0)
    joined = sub.add_parser("joined")
    joined.add_argument("--address", required=True)
    joined.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    common = ["--block", "--disable-usage-stats"]
    try:
        if args.command == "head":
            # --port=0: a free port, so jobs sharing a node never collide on Ray's default 6379
            return run_node([ray_executable(), "start", "--head", "--port=0", "--include-dashboard=false",
                             f"--temp-dir={args.temp_dir}", *node_resources(args.num_cpus, args.num_gpus),
                             *common])
        if args.command == "worker":
            wait_for_port(args.address, args.timeout)
            return run_node([ray_executable(), "start", f"--address={args.address}",
                             *node_resources(args.num_cpus, args.num_gpus), *common])
        if args.command == "address":
            print(read_address(args.temp_dir, args.timeout))
            return 0
        if args.command == "joined":
            print(", ".join(joined_nodes(args.address, args.timeout)) or "none")
            return 0
        alive = wait_for_nodes(args.address, args.nodes, args.timeout)
        print(f"ray_node: {alive} Ray node(s) alive at {args.address}")
        return 0
    except TimeoutError as exc:
        print(f"ray_node on {node_name()}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
