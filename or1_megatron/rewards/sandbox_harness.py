"""Test harness that runs INSIDE the sandbox: executes a solution and its tests, reports a verdict.

Owns the in-process test protocol for functional (`fn_name`) and assert-based tests. It is run as
a script by the sandbox's interpreter with only the standard library; it must never import
or1_megatron (the package is not a dependency of the sandboxed interpreter).

Protocol: the spec arrives as JSON on stdin, including a per-run secret. The harness then points
stdin and stdout at /dev/null before any solution code runs, so the solution cannot print a verdict
line by accident or read the spec; the verdict goes to a private duplicate of the original stdout
as one line `<secret> <json>`. An `exit(0)` inside the solution therefore yields no verdict (score 0).

Trust: functional tests are judged OUTSIDE the sandbox. The harness receives only their inputs and
reports each return value as JSON; the reward process compares them with the expected outputs,
which never enter the sandbox, so no tampering inside it can turn a wrong answer into a pass.
Assert-based tests must run their asserts next to the solution, in this process: the harness binds
everything it needs before the solution runs (patching this module's globals changes nothing), but
a solution that walks interpreter frames or replaces builtins could still fake a verdict there.
"""
import ast
import json
import os
import signal
import sys


class TestTimeout(BaseException):
    """Raised by the per-test timer. A BaseException so `except Exception` in solutions can't eat it."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _parse_args(case_input):
    # LiveCodeBench: one JSON value per line; APPS/TACO: already a list of arguments.
    if isinstance(case_input, str):
        return [json.loads(line) for line in case_input.split("\n") if line.strip()]
    return list(case_input)


def _timed(seconds, fn, *args):
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _exec_solution(spec):
    namespace = {"__name__": "__solution__", "__builtins__": __builtins__}
    code = compile(spec.get("prefix", "") + "\n" + spec["solution"], "<solution>", "exec")
    _timed(spec["per_test_s"], exec, code, namespace)
    return namespace


def _functional_tests(spec, namespace, outputs):
    """One test per input; each appends the return value, as JSON text, to `outputs`."""
    name = spec["fn_name"]
    solution_class = namespace.get("Solution")
    if solution_class is not None and hasattr(solution_class, name):
        fn = getattr(solution_class(), name)
    else:
        fn = namespace[name]  # OR1 also accepts a bare function named fn_name
    dumps = json.dumps
    tests = []
    for case_input in spec["inputs"]:
        def run(case_input=case_input):
            # Serialised here, compared outside: an object with a rigged __eq__ is just its JSON.
            outputs.append(dumps(fn(*_parse_args(case_input))))
        tests.append(run)
    return tests


def _statement_tests(statements, namespace):
    tests = []
    for stmt in statements:
        code = compile(ast.Module(body=[stmt], type_ignores=[]), "<test>", "exec")
        tests.append(lambda code=code: exec(code, namespace))
    return tests


def _assert_tests(spec, namespace, outputs):
    tree = ast.parse(spec["test_code"])
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        raise ValueError("test_code defines no check(candidate)")
    # Module-level helpers of the test code (everything but check) run first.
    exec(compile(ast.Module(body=[n for n in tree.body if n is not check], type_ignores=[]),
                 "<test>", "exec"), namespace)
    namespace[check.args.args[0].arg if check.args.args else "candidate"] = eval(
        spec["entry_point"], namespace)
    # One test per statement of check's body, run in one namespace so later asserts see earlier names.
    return _statement_tests(check.body, namespace)


def _assert_case_tests(spec, namespace, outputs):
    statements = []
    for case in spec["assert_case"]:
        statements.extend(ast.parse(case).body)
    return _statement_tests(statements, namespace)


def main():
    spec = json.loads(sys.stdin.read())
    secret = spec.pop("secret")
    verdict_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGALRM, _on_alarm)
    # Bound before any solution code runs: rebinding module globals later changes nothing here.
    build = {"functional": _functional_tests, "assert": _assert_tests,
             "assert_case": _assert_case_tests}[spec["mode"]]
    timed, exec_solution, write, dumps = _timed, _exec_solution, os.write, json.dumps
    per_test_s = spec["per_test_s"]
    passed, total, detail, outputs = 0, 0, "", []
    try:
        namespace = exec_solution(spec)
        tests = timed(per_test_s, build, spec, namespace, outputs)
        total = len(tests)
        for test in tests:
            timed(per_test_s, test)
            passed += 1
    except TestTimeout:
        detail = f"test {passed}: time limit exceeded"
    except BaseException as exc:  # the verdict must be written whatever the solution raised
        detail = f"test {passed}: {type(exc).__name__}: {str(exc)[:200]}"
    verdict = {"passed": passed, "total": total, "detail": detail, "outputs": outputs}
    write(verdict_fd, (secret + " " + dumps(verdict) + "\n").encode())


if __name__ == "__main__":
    main()
