"""Hostile programs are contained: each scores 0 within its time limit and the machine is unaffected.

These tests need bubblewrap: CI installs it (apt-get install -y bubblewrap). Without it they fail
on purpose for root, who can install it (scripts/install_system_deps.sh does), instead of passing
against the weak fallback; for other users, who cannot, they are skipped with that reason.
"""
import os
import shutil
import socket
import time
from pathlib import Path

import psutil
import pytest

from or1_megatron.rewards import RewardConfig, Sandbox, SandboxConfig, code_score
from or1_megatron.rewards.sandbox import NOBODY_UID
from tests.test_rewards_code import RIGGED_EQ

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and os.geteuid() != 0,
    reason="bubblewrap is not installed and only root can install it (scripts/install_system_deps.sh): "
           "code rewards run in the rlimits fallback")

LIMIT_S = 3.0
# A uid of its own, so that the leftover-process check sees only this module's programs.
SANDBOX_UID = NOBODY_UID - 10
CONFIG = RewardConfig(code_test_timeout_s=LIMIT_S, code_total_timeout_s=LIMIT_S,
                      sandbox=SandboxConfig(backend="bwrap", memory_mb=512, max_processes=16,
                                            uid=SANDBOX_UID))
SLACK_S = 3.0  # sandbox start-up and cleanup on a loaded 2-core machine


def _response(code: str) -> str:
    return f"<think>\nplan\n</think>\n```python\n{code}\n```"


def _score_within_limit(code: str, expected_stdout: str) -> float:
    start = time.monotonic()
    score = code_score(_response(code), {"inputs": [""], "outputs": [expected_stdout]}, config=CONFIG)
    assert time.monotonic() - start < LIMIT_S + SLACK_S
    return score


def _sandbox_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids is not None and uids.real == SANDBOX_UID:
            found.append(proc)
    return found


def test_bwrap_is_installed():
    assert shutil.which("bwrap"), "bubblewrap is missing: apt-get install -y bubblewrap"
    assert Sandbox(CONFIG.sandbox).backend == "bwrap"


def test_a_well_behaved_program_passes():
    assert _score_within_limit("print(sum(map(int, '1 2 3'.split())))", "6") == 1.0


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert _score_within_limit(bomb, "done") == 0.0
    deadline = time.monotonic() + 5
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_processes() == []
    assert _score_within_limit("print('after')", "after") == 1.0


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    assert _score_within_limit("while True:\n    pass\nprint('never')", "never") == 0.0
    assert time.monotonic() - start >= LIMIT_S * 0.9


def test_memory_bomb_fails_fast():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n"
    start = time.monotonic()
    assert _score_within_limit(bomb + "print('ok')", "ok") == 0.0
    assert time.monotonic() - start < LIMIT_S  # MemoryError at the address-space limit, not a timeout
    assert _score_within_limit("x = bytearray(8 << 30)\nprint('ok')", "ok") == 0.0


def test_writes_outside_the_sandbox_dir_do_not_land(tmp_path):
    target = tmp_path / "pwned"
    tmp_path.chmod(0o777)  # writable for everyone on the host: only the sandbox can stop the write
    code = f"open({str(target)!r}, 'w').write('x')\nprint('wrote')"
    assert _score_within_limit(code, "wrote") == 0.0
    assert not target.exists()
    host_tmp = f"/tmp/or1-sandbox-escape-{os.getpid()}"
    code = f"open({host_tmp!r}, 'w').write('x')\nprint('wrote')"
    assert _score_within_limit(code, "wrote") == 0.0
    assert not os.path.exists(host_tmp)
    # Its own working directory is writable, and thrown away.
    assert _score_within_limit("open('scratch.txt', 'w').write('x')\nprint(open('scratch.txt').read())",
                               "x") == 1.0


def test_host_directories_outside_tmp_stay_read_only():
    """/tmp is a private tmpfs inside anyway: the root filesystem itself must be read-only. A
    world-writable host directory outside /tmp (made for the test) and the project's own
    directory (made writable for everyone for the test) must not take a write."""
    import tempfile

    project = Path(__file__).resolve().parents[1]
    var_tmp = Path(tempfile.mkdtemp(prefix="or1-sandbox-probe-", dir="/var/tmp"))
    project_probe = Path(tempfile.mkdtemp(prefix=".or1-sandbox-probe-", dir=project))
    try:
        for directory in (var_tmp, project_probe):
            directory.chmod(0o777)  # the host lets anyone write here: only the sandbox can stop it
            target = directory / "pwned"
            code = f"open({str(target)!r}, 'w').write('x')\nprint('wrote')"
            assert _score_within_limit(code, "wrote") == 0.0, directory
            assert not target.exists(), directory
    finally:
        shutil.rmtree(var_tmp, ignore_errors=True)
        shutil.rmtree(project_probe, ignore_errors=True)


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    assert _score_within_limit(code, "connected") == 0.0
    # A connection that got through would wait in the backlog now.
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()


def test_trainer_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("OR1_TRAINER_SECRET", "s3cret")
    code = "import os\nprint(os.environ.get('OR1_TRAINER_SECRET', 'absent'))"
    assert _score_within_limit(code, "s3cret") == 0.0
    result = Sandbox(CONFIG.sandbox).run_python(code, time_limit_s=LIMIT_S)
    assert result.stdout.strip() == "absent"


def test_output_is_capped():
    sandbox = Sandbox(SandboxConfig(backend="bwrap", max_output_mb=1))
    result = sandbox.run_python("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))",
                                time_limit_s=LIMIT_S)
    assert not result.ok and len(result.stdout) <= 1 << 20


def test_runs_unprivileged_with_a_private_tmp():
    result = Sandbox(CONFIG.sandbox).run_python(
        "import os\nprint(os.getuid(), os.access('/tmp', os.W_OK), os.path.exists('/root/.bashrc'))",
        time_limit_s=LIMIT_S)
    uid = SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    assert result.stdout.split() == [str(uid), "False", "False"]


def test_fallback_warns_loudly_and_still_limits(caplog, monkeypatch):
    # An interpreter every user can run (the venv's may live under /root, closed to the sandbox uid).
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    assert python
    monkeypatch.setenv("OR1_TRAINER_SECRET", "s3cret")
    with caplog.at_level("WARNING"):
        sandbox = Sandbox(SandboxConfig(backend="rlimits", python=python, uid=SANDBOX_UID))
    assert sandbox.backend == "rlimits"
    assert "SANDBOX FALLBACK IN FORCE" in caplog.text
    result = sandbox.run_python(
        "import os\nprint(os.environ.get('OR1_TRAINER_SECRET', 'absent'), os.getuid())",
        time_limit_s=LIMIT_S)
    uid = SANDBOX_UID if os.geteuid() == 0 else os.geteuid()
    assert result.ok and result.stdout.split() == ["absent", str(uid)]
    start = time.monotonic()
    assert sandbox.run_python("while True:\n    pass", time_limit_s=1.0).timed_out
    assert time.monotonic() - start < 1.0 + SLACK_S


@pytest.mark.skipif(os.geteuid() != 0, reason="only root needs the uid switch")
def test_fallback_refuses_an_interpreter_the_sandbox_uid_cannot_reach(tmp_path):
    from or1_megatron.rewards import SandboxError

    hidden = tmp_path / "hidden"
    (hidden / "bin").mkdir(parents=True)
    (hidden / "bin" / "python").symlink_to(shutil.which("python3", path="/usr/bin"))
    hidden.chmod(0o700)
    with pytest.raises(SandboxError, match="cannot run"):
        Sandbox(SandboxConfig(backend="rlimits", python=str(hidden / "bin" / "python")))


def test_requesting_bwrap_without_it_is_an_error(monkeypatch):
    from or1_megatron.rewards import SandboxError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxError, match="apt-get install -y bubblewrap"):
        Sandbox(SandboxConfig(backend="bwrap"))


def test_contest_imports_are_available():
    from or1_megatron.rewards.sandbox import check_sandbox

    check_sandbox(Sandbox(CONFIG.sandbox))  # raises with the interpreter's stderr otherwise


def test_a_python_from_a_venv_under_tmp_runs_in_the_sandbox(tmp_path_factory):
    """The sandbox mounts a private /tmp: an interpreter living there (a venv made in /tmp) is
    bound back read-only, so correct programs still score 1."""
    import subprocess
    import sys
    import tempfile

    base = Path(sys.executable).resolve()
    venv = Path(tempfile.mkdtemp(prefix="or1-venv-", dir="/tmp")) / "venv"
    try:
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=120)
        os.chmod(venv.parent, 0o755)  # as a venv made with `python -m venv /tmp/venv` is
        # the contest import the sandbox checks for, copied in (nothing outside the interpreter's
        # prefixes is visible inside)
        import sortedcontainers

        site = next((venv / "lib").glob("python3*/site-packages"))
        shutil.copytree(Path(sortedcontainers.__file__).parent, site / "sortedcontainers")
        config = RewardConfig(code_test_timeout_s=LIMIT_S, code_total_timeout_s=LIMIT_S,
                              sandbox=SandboxConfig(backend="bwrap", uid=SANDBOX_UID,
                                                    python=str(venv / "bin" / "python")))
        program = "import sys\nprint(sys.prefix)"
        assert code_score(_response(program), {"inputs": [""], "outputs": [str(venv)]},
                          config=config) == 1.0
        # and the interpreter stays read-only there
        write = f"open({str(venv / 'pwned')!r}, 'w')\nprint('wrote')"
        assert code_score(_response(write), {"inputs": [""], "outputs": ["wrote"]},
                          config=config) == 0.0
        assert not (venv / "pwned").exists()
    finally:
        shutil.rmtree(venv.parent, ignore_errors=True)


def _no_sandbox_process_left(within_s: float = 5.0) -> list:
    """The sandbox uid's processes, once they are gone or `within_s` has passed (a killed
    process takes a moment to be reaped)."""
    deadline = time.monotonic() + within_s
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _sandbox_processes()


@pytest.mark.parametrize("program", [
    # leaves bwrap's process group and sleeps: no CPU time, so no CPU limit ever fires
    "import os, time\nprint(0, flush=True)\nos.setsid()\ntime.sleep(10**6)",
    # a double-forked daemon in a session of its own, while the program itself keeps running
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        time.sleep(10**6)\n    os._exit(0)\nprint(0, flush=True)\ntime.sleep(10**6)",
])
def test_no_process_outlives_the_time_limit(program):
    assert _score_within_limit(program, "done") == 0.0
    assert _no_sandbox_process_left() == []
    assert _score_within_limit("print('after')", "after") == 1.0  # the uid's process cap is free


def test_a_directory_too_deep_for_rmtree_is_removed_and_scores_zero():
    import subprocess
    import tempfile

    # Not under pytest's tmp_path: a sandbox that failed this test would leave a tree there
    # that pytest's own clean-up (shutil.rmtree) cannot remove in later sessions.
    root = Path(tempfile.mkdtemp(prefix="or1-deep-sandboxes-"))
    try:
        config = RewardConfig(code_test_timeout_s=LIMIT_S * 3, code_total_timeout_s=LIMIT_S * 3,
                              sandbox=SandboxConfig(backend="bwrap", uid=SANDBOX_UID,
                                                    tmp_root=str(root)))
        deep = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
        assert code_score(_response(deep), {"inputs": [""], "outputs": ["shallow"]},
                          config=config) == 0.0
        assert list(root.iterdir()) == []  # nothing left on the host
        assert code_score(_response("print('ok')"), {"inputs": [""], "outputs": ["ok"]},
                          config=config) == 1.0
    finally:
        subprocess.run(["rm", "-rf", "--", str(root)], check=False)


def test_integer_answers_compare_exactly():
    from or1_megatron.rewards.code_reward import outputs_match

    assert not outputs_match("1200000000", "1200000001")
    assert not outputs_match("3 1200000000", "3 1200000001")
    assert outputs_match("0.3333333", "0.33333333")  # floats keep their tolerance
    functional = {"inputs": [[10**9]], "outputs": [10**9], "fn_name": "f"}
    assert code_score(_response("def f(x):\n    return x + 1.0"), functional, config=CONFIG) == 0.0
    assert code_score(_response("def f(x):\n    return x"), functional, config=CONFIG) == 1.0


FORGE = """import os, sys
frame = sys._getframe()
while frame is not None and "verdict_fd" not in frame.f_locals:
    frame = frame.f_back
os.write(frame.f_locals["verdict_fd"], (frame.f_locals["secret"] + " {BODY}\\n").encode())
def f(x):
    return -1
"""


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '{"passed": "all", "total": 1, "detail": "", "outputs": []}'])
def test_a_forged_malformed_verdict_scores_zero_and_does_not_raise(body):
    """A program that reaches the harness's verdict channel can write anything there; what is not
    a well-formed verdict scores 0 for this sample, never raises (a well-formed one only reports
    values, judged outside: see test_assert_style_tests_cannot_be_faked)."""
    code = FORGE.replace("{BODY}", body.replace('"', '\\\\"'))
    functional = {"inputs": [[1]], "outputs": [1], "fn_name": "f"}
    assert code_score(_response(code), functional, config=CONFIG) == 0.0


def test_comparing_a_flood_of_short_lines_costs_little_memory():
    """A flood of one-character lines compared against the expected output: the comparison reads
    lines and tokens as it goes instead of listing them (listed, the 16 MiB output cap's worth of
    such lines took ~270 MiB; at this test's 512 KiB, ~8 MiB)."""
    import tracemalloc

    from or1_megatron.rewards.code_reward import outputs_match

    got = "a\n" * (256 << 10)
    want = got[:-2] + "b\n"  # differs only at the very end: every line is looked at
    tracemalloc.start()
    try:
        assert not outputs_match(got, want)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(got), f"{peak / 2**20:.1f} MiB for {len(got) / 2**20:.1f} MiB of output"


def test_host_data_the_project_and_host_sockets_are_not_visible():
    """Attack 3: a program that finds the data its tests come from can print the stored answer.
    Attack 6: a host unix socket (munge's is world-writable) is reachable without a network.
    Inside, only /usr, the interpreter's prefixes and a few /etc files exist."""
    import socket as sockets
    import tempfile

    project = Path(__file__).resolve().parents[1]
    sock_dir = Path(tempfile.mkdtemp(prefix="or1-sock-", dir="/var/tmp"))
    server = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        sock_dir.chmod(0o777)
        sock_path = sock_dir / "s"
        server.bind(str(sock_path))
        sock_path.chmod(0o777)
        server.listen(1)
        secret_places = [project / "README.md", project / ".git", project.parent / "shared",
                         Path("/root/.bashrc"), Path("/run"), Path("/var")]
        program = (
            "import os, socket\n"
            f"print(sum(os.path.exists(p) for p in {[str(p) for p in secret_places]!r}))\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"try:\n    s.connect({str(sock_path)!r})\n    print('connected')\n"
            "except OSError:\n    print('unreachable')\n")
        assert _score_within_limit(program, "0\nunreachable") == 1.0
    finally:
        server.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


MANY_PROCESSES = """import os, time
readers = []
for _ in range(4):
    r, w = os.pipe()
    if os.fork() == 0:
        block = bytearray(600 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(w, b"k")
        time.sleep(3)
        os._exit(0)
    readers.append(r)
got = sum(len(os.read(r, 1)) for r in readers)
print("all" if got == 4 else "bounded")
"""
MEMFD = """import os
chunk = b"x" * (15 << 20)  # each file under the 16 MiB file-size limit
fds = [os.memfd_create("hoard") for _ in range(100)]
for fd in fds:  # 1.5 GiB in all, none of it in the address space the per-process limit counts
    os.write(fd, chunk)
print("all")
"""


@pytest.mark.parametrize("program", [MANY_PROCESSES, MEMFD], ids=["four_processes", "memfd"])
def test_memory_is_bounded_per_sandbox_not_per_process(program):
    """Attack 4: the 1 GiB address-space limit is per process: four processes of 600 MB, or
    1.5 GiB of memfd in one, took the host's memory. A cgroup caps the sandbox as a whole."""
    if Sandbox(CONFIG.sandbox)._cgroups is None:
        pytest.skip("no writable cgroup here: the sandbox warned at start and keeps rlimits only")
    config = RewardConfig(code_test_timeout_s=20, code_total_timeout_s=20,
                          sandbox=SandboxConfig(backend="bwrap", memory_mb=1024, max_processes=16,
                                                uid=SANDBOX_UID))
    assert code_score(_response(program), {"inputs": [""], "outputs": ["all"]}, config=config) == 0.0
    assert _no_sandbox_process_left() == []
    assert code_score(_response("print('after')"), {"inputs": [""], "outputs": ["after"]},
                      config=config) == 1.0


# Attack 2: assert-style tests judged next to the solution could be faked. Each of these solutions
# is wrong (f(x) should be x + 1); each faking trick made it score 1.
ASSERT_TESTS = {
    "check(candidate)": {"import_prefix": "", "entry_point": "f",
                         "test_code": "def check(candidate):\n    assert candidate(1) == 2\n"
                                      "    assert candidate(5) == 6\n"},
    "assert_case": {"assert_case": ["assert f(1) == 2", "assert f(5) == 6"]},
}
FAKES = {
    "rigged_eq": RIGGED_EQ + "def f(x):\n    return Always()",
    "replaced_exec": "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n"
                     "builtins.eval = lambda *args, **kwargs: (lambda *a, **k: 0)\n"
                     "def f(x):\n    return 0",
    "forged_verdict": "import os, sys\nframe = sys._getframe()\n"
                      "while frame is not None and 'verdict_fd' not in frame.f_locals:\n"
                      "    frame = frame.f_back\n"
                      "if frame is not None:\n"
                      "    os.write(frame.f_locals['verdict_fd'], (frame.f_locals['secret'] + ' {\"passed\": 2,"
                      " \"total\": 2, \"detail\": \"\", \"outputs\": []}\\n').encode())\n"
                      "    os._exit(0)\n"
                      "def f(x):\n    return 0",
    # takes the expected value of the matching assert out of the harness's spec in memory
    "read_the_spec": "import re, sys\n"
                     "def f(x):\n"
                     "    frame = sys._getframe()\n"
                     "    while frame is not None:\n"
                     "        text = repr(frame.f_locals)\n"
                     "        found = re.search(r'\\(%d\\) == (\\d+)' % x, text)\n"
                     "        if found:\n"
                     "            return int(found.group(1))\n"
                     "        frame = frame.f_back\n"
                     "    return 0",
}


@pytest.mark.parametrize("schema", sorted(ASSERT_TESTS))
@pytest.mark.parametrize("fake", sorted(FAKES))
def test_assert_style_tests_cannot_be_faked(schema, fake):
    ground_truth = ASSERT_TESTS[schema]
    assert code_score(_response(FAKES[fake]), ground_truth, config=CONFIG) == 0.0
    assert _no_sandbox_process_left() == []
    assert code_score(_response("def f(x):\n    return x + 1"), ground_truth, config=CONFIG) == 1.0
