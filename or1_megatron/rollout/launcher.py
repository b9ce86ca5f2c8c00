"""Engine processes: start one, wait until it serves, kill it (its whole process group), restart it.

`EngineProcess` is the lifecycle shared by every engine that runs as a server process; a
subclass only says which command line to run. `CpuEngineProcess` runs `or1 serve`; the SGLang
adapter runs `python -m sglang.launch_server`; `AttachedEngine` stands for a server someone
else started (given by URL), which is probed but never started, killed or restarted. Each
process gets its own session, so a kill reaches the server's children too (SGLang forks
scheduler and detokenizer processes), and its output goes to a log file whose tail is quoted
when start-up fails. This module never sends
requests beyond the readiness probe.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from or1_megatron.distributed.fork_launcher import free_port  # noqa: F401  (re-exported)
from or1_megatron.errors import OR1Error


class EngineStartError(OR1Error):
    """An engine process exited or did not answer /health within its start-up timeout."""


class EngineProcess:
    """One engine server process on `host:port`, restartable on the same port."""

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = 300.0):
        self.host = host
        self.port = port or free_port()
        self.env = env or {}
        self.start_timeout_s = start_timeout_s
        self.log_dir = Path(log_dir) if log_dir else Path("/tmp/or1_engine_logs")
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"engine_{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the process (returns at once; `wait_ready` waits for it to serve)."""
        if self.alive():
            raise EngineStartError(f"engine on {self.url} is already running (pid {self.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until GET /health answers 200; EngineStartError if the process dies or stalls."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineStartError(f"engine on {self.url} exited with code "
                                       f"{self.exit_code()}:\n"
                                       f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise EngineStartError(f"engine on {self.url} not ready after "
                               f"{timeout_s or self.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit status of the process once it has ended (None while it runs or never ran)."""
        return self.process.returncode if self.process else None

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> None:
        """Signal the engine's whole process group and reap it."""
        if self.process is None:
            return
        # The group, not only its leader: a server whose leader already exited may have left
        # children (schedulers, workers) behind. A group id is not reused while any member lives.
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def restart(self) -> None:
        """Kill whatever is left and start again on the same port; `wait_ready` after it."""
        self.kill()
        self.restarts += 1
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class CpuEngineProcess(EngineProcess):
    """`or1 serve` (the torch engine: on the CPU, or on the GPU with device="cuda") as a server
    process."""

    def __init__(self, model_path: str | Path, *, random_seed: int = 0, num_threads: int = 1,
                 max_running_requests: int = 64, weight_version: str = "default",
                 device: str = "cpu", dtype: str = "float32",
                 extra_args: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model_path = str(model_path)
        self.device = device
        self.dtype = dtype
        self.random_seed = random_seed
        self.num_threads = num_threads
        self.max_running_requests = max_running_requests
        self.weight_version = weight_version
        self.extra_args = list(extra_args or [])
        # The child must import this package even when it is not installed (a source checkout).
        package_root = str(Path(__file__).resolve().parents[2])
        paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env.setdefault("PYTHONPATH", os.pathsep.join(paths))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "or1_megatron.rollout.server",
                "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
                "--random-seed", str(self.random_seed), "--num-threads", str(self.num_threads),
                "--max-running-requests", str(self.max_running_requests),
                "--weight-version", self.weight_version, "--device", self.device,
                "--dtype", self.dtype, "--exit-with-parent", *self.extra_args]


class AttachedEngine(EngineProcess):
    """An engine server this process did not start, given by its URL (`or1 serve` or SGLang).

    The router uses it like any engine process: readiness and health are probed over HTTP, but it
    is never started or killed from here, and a failed one cannot be restarted, so the router
    takes it out of service and keeps serving with the others.
    """

    def __init__(self, url: str, *, start_timeout_s: float = 60.0):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise EngineStartError(f"engine URL {url!r} must look like http://HOST:PORT")
        super().__init__(host=parts.hostname, port=parts.port, start_timeout_s=start_timeout_s)

    def start(self) -> None:
        raise EngineStartError(f"engine on {self.url} was attached by URL; start it yourself")

    def alive(self) -> bool:
        return True  # no process to poll here: the router's /health probes judge it

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> None:
        return None  # not ours to kill

    def restart(self) -> None:
        raise EngineStartError(f"engine on {self.url} was attached by URL and cannot be restarted "
                               "from here")

    def log_tail(self, lines: int = 30) -> str:
        return "(engine attached by URL: its log is wherever it was started)"
