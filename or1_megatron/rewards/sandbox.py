"""Run one untrusted Python program with limits: the only place model-written code is executed.

Owns process isolation and resource limits. It knows nothing about test formats or rewards
(see code_reward.py) and must never run a program outside the isolation it reports.

Isolation, from strong to weak (`SandboxConfig.backend`):
- "bwrap": bubblewrap with a filesystem built from nothing (/usr, the interpreter's prefixes and
  a few /etc files, read-only: no data sets, project, home directories or host sockets), a private
  /tmp, /dev and /proc, no network, its own PID namespace (the program is PID 1 via --as-pid-1;
  at the limit every process under bwrap is killed by pid, which ends the namespace).
- "rlimits": the fallback when bwrap is missing: a new session, rlimits, a clean environment and,
  for root, an unprivileged uid; the file system and network stay visible. It logs a warning.
In both, when the caller is root the program runs as an unprivileged uid (process-count limits do
nothing for root), under prlimit's CPU, address-space, process-count, file-size and open-file limits,
with an environment built from scratch, stdin/stdout in files (so no pipe can deadlock) and stdout
capped by the file-size limit.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from or1_megatron.errors import OR1Error
from or1_megatron.rewards.sandbox_cgroup import CgroupBounds, CgroupUnavailable

logger = logging.getLogger(__name__)

NOBODY_UID = 65534
SYSTEM_PREFIX = Path("/usr")  # bound read-only into every sandbox
# The host's /etc files a Python program needs (the dynamic loader's cache, time zone, user names).
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/passwd", "/etc/group")
# Inside the sandbox: where the throwaway directory is mounted (on the private /tmp).
WORK_DIR = "/tmp/sandbox"
PROGRAM_PATH = "/tmp/program.py"


class SandboxError(OR1Error):
    """The sandbox cannot run programs as configured (missing tool, unusable interpreter)."""


@dataclass
class SandboxConfig:
    """Limits and isolation for one program run. Times are seconds, sizes MiB."""

    backend: str = "auto"  # "auto" (bwrap if installed, else rlimits with a warning), "bwrap", "rlimits"
    python: str = sys.executable  # interpreter inside the sandbox; must provide the contest imports
    memory_mb: int = 2048  # RLIMIT_AS per process, and the whole sandbox's memory (cgroup)
    max_processes: int = 16  # RLIMIT_NPROC for the sandbox uid and the sandbox's cgroup (threads too)
    max_output_mb: int = 16  # RLIMIT_FSIZE: caps stdout and any file the program writes
    max_open_files: int = 256
    uid: int = NOBODY_UID  # used only when the caller is root
    tmp_root: str | None = None  # where throwaway directories are created (default: system temp)
    extra_env: dict[str, str] = field(default_factory=dict)  # added to the clean environment


@dataclass
class RunResult:
    """What one program run did. `stdout` is decoded leniently and capped by the file-size limit."""

    returncode: int | None  # None when it was killed for time
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def resolve_backend(requested: str) -> str:
    """The backend actually used: "bwrap" or "rlimits"; warns when the weak fallback is in force."""
    if requested not in ("auto", "bwrap", "rlimits"):
        raise SandboxError(f"sandbox backend must be auto, bwrap or rlimits, got {requested!r}")
    has_bwrap = shutil.which("bwrap") is not None
    if requested == "bwrap" and not has_bwrap:
        raise SandboxError("sandbox backend 'bwrap' requested but bwrap is not installed "
                           "(Debian: apt-get install -y bubblewrap)")
    if requested == "rlimits" or not has_bwrap:
        logger.warning(
            "SANDBOX FALLBACK IN FORCE: running model code with rlimits only (%s); the file system "
            "and network stay visible to it. Install bubblewrap for real isolation.",
            "requested" if requested == "rlimits" else "bwrap not found",
        )
        return "rlimits"
    return "bwrap"


_CGROUP_LAYOUT: list[CgroupBounds | None] = []  # detected once per process


def _cgroup_bounds() -> CgroupBounds | None:
    """The per-sandbox cgroup layout, or None with a warning saying what is then not bounded."""
    if not _CGROUP_LAYOUT:
        try:
            _CGROUP_LAYOUT.append(CgroupBounds.detect())
        except (CgroupUnavailable, OSError) as exc:
            logger.warning(
                "SANDBOX: no per-sandbox memory and process bounds (%s); each process keeps its "
                "rlimits, but a program's processes and memfds together may use more memory than "
                "one process may. Run as root with a writable cgroup (v1 memory+pids, or v2 with "
                "those controllers delegated) to bound them.", exc)
            _CGROUP_LAYOUT.append(None)
    return _CGROUP_LAYOUT[0]


def _hidden_ancestor(path: Path) -> Path | None:
    """The highest ancestor of `path` that other users cannot traverse (e.g. /root), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


class Sandbox:
    """Runs programs under one `SandboxConfig`. Cheap to build; holds no processes between runs."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.backend = resolve_backend(self.config.backend)
        self._as_root = os.geteuid() == 0
        found = shutil.which(self.config.python)
        if found is None:
            raise SandboxError(f"sandbox interpreter {self.config.python!r} not found or not executable")
        # Absolute, as found here: the sandbox's PATH is not the trainer's.
        self.python = str(Path(found).absolute())
        self._cgroups = _cgroup_bounds() if self.backend == "bwrap" and self._as_root else None
        # The same for every run: built once, not per test case.
        self._filesystem_args = self._filesystem() if self.backend == "bwrap" else []
        hidden = any(_hidden_ancestor(prefix) for prefix in self._prefixes())
        if self.backend == "rlimits" and self._as_root and hidden:
            # Without bwrap nothing can expose an interpreter under e.g. /root to the sandbox uid,
            # and running model code as root is not an option.
            raise SandboxError(
                f"the rlimits fallback cannot run {self.python} as uid {self.config.uid}: it "
                "lives under a directory other users cannot enter. Install bubblewrap, or set "
                "SandboxConfig.python to an interpreter other users can run.")

    # ---- command construction -------------------------------------------------------------
    def _prefixes(self) -> list[Path]:
        """The interpreter's installation prefixes: a venv's bin/python links to the base
        install, so both must be reachable."""
        python = Path(self.python)
        return sorted({python.absolute().parent.parent, python.resolve().parent.parent})

    def _filesystem(self) -> list[str]:
        """bwrap args for the sandbox's whole filesystem, built from nothing: the system's
        programs and libraries (/usr and the /bin, /lib, ... links), the few /etc files a Python
        needs, and the interpreter's prefixes (its venv too), all read-only; a private /dev,
        /proc and /tmp. Nothing else of the host is there: no data sets, no project (only a venv
        inside it, when that is the interpreter), no home directories, no sockets of /run."""
        args = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = Path("/") / name
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        for name in ETC_FILES:
            if Path(name).exists():
                args += ["--ro-bind", name, name]
        args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        made: set[Path] = set()
        for prefix in self._prefixes():
            if prefix == SYSTEM_PREFIX or SYSTEM_PREFIX in prefix.parents:
                continue  # bound with /usr
            # Directories bwrap creates on the way are 0700 otherwise: make them traversable.
            for mid in reversed(prefix.parents):
                if mid != Path("/") and mid not in made:
                    args += ["--perms", "0755", "--dir", str(mid)]
                    made.add(mid)
            args += ["--ro-bind", str(prefix), str(prefix)]
        return args

    def _limits(self, time_limit_s: float) -> list[str]:
        cfg = self.config
        cpu = int(time_limit_s) + 1  # the wall-clock kill comes first; this stops a detached spinner
        return ["prlimit", f"--cpu={cpu}", f"--as={cfg.memory_mb << 20}",
                f"--nproc={cfg.max_processes}", f"--fsize={cfg.max_output_mb << 20}",
                f"--nofile={cfg.max_open_files}", "--core=0", "--"]

    def _drop_privileges(self) -> list[str]:
        if not self._as_root:
            return []
        uid = str(self.config.uid)
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--"]

    def _environment(self) -> dict[str, str]:
        # Built from nothing: no variable of the trainer (tokens, paths, secrets) reaches the program.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": WORK_DIR,
            "TMPDIR": WORK_DIR,
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        env.update(self.config.extra_env)
        return env

    def _command(self, host_dir: Path, argv: list[str], time_limit_s: float) -> list[str]:
        inner = self._drop_privileges() + self._limits(time_limit_s) + argv
        if self.backend == "rlimits":
            return inner
        return [
            "bwrap", *self._filesystem_args,
            "--bind", str(host_dir / "work"), WORK_DIR,
            "--ro-bind", str(host_dir / "program.py"), PROGRAM_PATH,
            # The private /tmp holds only those two; read-only, so that a program run by a user
            # who owns the tmpfs (no uid switch without root) cannot fill memory through it.
            "--remount-ro", "/tmp",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--as-pid-1", "--chdir", WORK_DIR,
            *inner,
        ]

    # ---- running ---------------------------------------------------------------------------
    def run_python(self, source: str, stdin: str | bytes = "", time_limit_s: float = 6.0,
                   args: list[str] | None = None) -> RunResult:
        """Run `source` as a Python script with `stdin`; killed with everything it started after
        `time_limit_s` of wall time."""
        host_dir = Path(tempfile.mkdtemp(prefix="or1-sandbox-", dir=self.config.tmp_root))
        try:
            return self._run_in(host_dir, source, stdin, time_limit_s, args or [])
        finally:
            self._cleanup(host_dir)

    def _run_in(self, host_dir: Path, source: str, stdin: str | bytes, time_limit_s: float,
                args: list[str]) -> RunResult:
        work = host_dir / "work"
        work.mkdir()
        program = host_dir / "program.py"
        program.write_text(source, encoding="utf-8")
        stdin_path = host_dir / "stdin"
        stdin_path.write_bytes(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
        if self._as_root:
            os.chown(work, self.config.uid, self.config.uid)
        # bwrap binds what the program needs, so nobody needs to enter host_dir; the fallback
        # needs to traverse it to reach program.py. The program gets stdin (which may hold the
        # harness's secret) only as an open file, never by path.
        os.chmod(host_dir, 0o700 if self.backend == "bwrap" else 0o711)
        os.chmod(program, 0o644)
        os.chmod(stdin_path, 0o600)
        script = PROGRAM_PATH if self.backend == "bwrap" else str(program)
        cwd = None if self.backend == "bwrap" else str(work)
        env = self._environment()
        if self.backend == "rlimits":
            env["HOME"] = env["TMPDIR"] = str(work)
        argv = [self.python, "-I", script, *args]
        cmd = self._command(host_dir, argv, time_limit_s)
        cgroups: list[Path] = []
        if self._cgroups is not None:
            cgroups = self._cgroups.create(self.config.memory_mb << 20, self.config.max_processes)
            cmd = self._cgroups.enter_command(cgroups) + cmd
        with open(stdin_path, "rb") as fin, open(host_dir / "stdout", "wb") as fout, \
                open(host_dir / "stderr", "wb") as ferr:
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, env=env, cwd=cwd,
                                    start_new_session=True, close_fds=True)
            timed_out = not _wait_for_exit(proc, time_limit_s)
            returncode: int | None = None
            if timed_out:
                self._kill(proc)
            else:
                returncode = proc.wait()
            wall = time.monotonic() - start
        if self.backend == "rlimits":
            self._kill_leftovers(proc)
        if cgroups:
            CgroupBounds.remove(cgroups)
        cap = self.config.max_output_mb << 20
        return RunResult(
            returncode=returncode,
            stdout=_read_capped(host_dir / "stdout", cap),
            stderr=_read_capped(host_dir / "stderr", 64 << 10),
            timed_out=timed_out,
            wall_s=wall,
        )

    def _kill(self, proc: subprocess.Popen) -> None:
        """Kill bwrap and everything under it. A program that called setsid has left bwrap's
        process group, and the uid change drops --die-with-parent, so the group alone is not
        enough: every descendant (the namespace's PID 1 among them, whose death ends the whole
        PID namespace) is killed by pid, found while bwrap still holds them as its tree."""
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        for child in descendants:
            try:
                child.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _kill_leftovers(self, proc: subprocess.Popen) -> None:
        """Without a PID namespace, children that left the session survive: kill the whole uid."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._as_root:
            # kill(-1) as the sandbox uid reaches exactly the processes of that uid.
            subprocess.run(["setpriv", f"--reuid={self.config.uid}", f"--regid={self.config.uid}",
                            "--clear-groups", "kill", "-9", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def _cleanup(self, host_dir: Path) -> None:
        """Remove the run's host directory, however deep the program made it (shutil.rmtree
        recurses and raises RecursionError past ~1000 levels; GNU rm does not). Never raises:
        a directory left behind is logged, and the sample keeps its score."""
        try:
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(host_dir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                           check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("sandbox: could not remove %s: %s", host_dir, exc)
            return
        if host_dir.exists():
            logger.warning("sandbox: %s is still there after rm -rf", host_dir)


def _wait_for_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True when `proc` exits within `timeout_s`.

    Popen.wait(timeout) polls with sleeps growing to 50 ms, which alone would double the cost of
    a short test case; a pidfd wakes us the moment the process exits.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(pidfd)


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", errors="replace")


def check_sandbox(sandbox: Sandbox) -> None:
    """Fail loudly when the sandbox's interpreter cannot run or lacks the contest imports.

    Without this, every correct program would silently score 0.
    """
    probe = "import sortedcontainers, heapq, bisect, collections, math, functools\nprint('ok')\n"
    result = sandbox.run_python(probe, time_limit_s=30.0)
    if result.stdout.strip() != "ok":
        raise SandboxError(
            f"the sandbox ({sandbox.backend}) cannot run {sandbox.python} with the contest "
            f"imports (sortedcontainers, ...): rc={result.returncode} stderr={result.stderr[-2000:]!r}"
        )
