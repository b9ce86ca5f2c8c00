"""Test harness that runs INSIDE the sandbox: executes a solution and its tests, reports a verdict.

Owns the in-process test protocol for functional (`fn_name`) and assert-based tests. It is run as
a script by the sandbox's interpreter with only the standard library; it must never import
or1_megatron (the package is not a dependency of the sandboxed interpreter).

Protocol: the spec arrives as JSON on stdin, including a per-run secret. The harness then points
stdin and stdout at /dev/null before any solution code runs, so the solution cannot print a verdict
line by accident or read the spec; the verdict goes to a private duplicate of the original stdout
as one line `<secret> <json>`. An `exit(0)` inside the solution therefore yields no verdict (score 0).

Trust: nothing is judged here. Functional tests send only their inputs; the harness reports each
return value as JSON and the reward process compares them with the expected outputs. Assert-based
tests send only each assert's probe (the expression the solution computes, e.g. `candidate(7)`);
the harness reports its value encoded by `_encode` and the reward process judges the assert
(assert_judge.py). The expected values never enter the sandbox, so whatever a solution does in
here (rig `__eq__`, replace builtins, walk frames to the verdict channel and write one), it cannot
know which values would pass.
"""
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


# Values deeper than this are reported as unserialisable (a cycle would never end).
_MAX_DEPTH = 200


def _encode(value, depth=0):
    """A return value as JSON-ready data that keeps Python's equality: a tuple is not a list,
    dict keys need not be strings; ListNode/TreeNode (the LeetCode prelude's classes) become
    their values. Every JSON object is a tag (see assert_judge.decode_value). Anything else is
    not reported (TypeError): the test fails."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply to report")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        value = int.__index__(value)
        return value if value.bit_length() < 4000 else {"int": hex(value)}
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, list):
        return [_encode(item, depth + 1) for item in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, depth + 1) for item in tuple.__iter__(value)]}
    if isinstance(value, (set, frozenset)):
        return {"set": [_encode(item, depth + 1) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in dict.items(value)]}
    kind = type(value).__name__
    if kind == "ListNode":
        return {"list_node": _list_values(value, depth)}
    if kind == "TreeNode":
        return {"tree_node": _tree_level_order(value, depth)}
    raise TypeError(f"a {kind} cannot be reported: return plain data")


_MAX_NODES = 1 << 20


def _list_values(head, depth):
    values = []
    while head is not None:
        if len(values) >= _MAX_NODES:
            raise ValueError("linked list too long (a cycle?)")
        values.append(_encode(head.val, depth + 1))
        head = head.next
    return values


def _tree_level_order(root, depth):
    order, queue, index = [], [root], 0
    while index < len(queue):
        node = queue[index]
        index += 1
        if node is None:
            order.append(None)
            continue
        if len(queue) > 2 * _MAX_NODES:
            raise ValueError("tree too large (a cycle?)")
        order.append(_encode(node.val, depth + 1))
        queue.extend((node.left, node.right))
    while order and order[-1] is None:
        order.pop()
    return order


def _probe_tests(spec, namespace, outputs):
    """Assert-based tests: the test code's helpers run first, `candidate` is bound to the entry
    point, then one test per probe expression, each appending its encoded value to `outputs`."""
    exec(compile(spec["setup"], "<test>", "exec"), namespace)
    if spec["candidate"]:
        namespace[spec["candidate"]] = eval(spec["entry_point"], namespace)
    dumps, encode = json.dumps, _encode
    tests = []
    for source in spec["probes"]:
        code = compile(source, "<test>", "eval")
        def run(code=code):
            outputs.append(dumps(encode(eval(code, namespace))))
        tests.append(run)
    return tests


def main():
    spec = json.loads(sys.stdin.read())
    secret = spec.pop("secret")
    verdict_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGALRM, _on_alarm)
    # Bound before any solution code runs: rebinding module globals later changes nothing here.
    build = {"functional": _functional_tests, "probes": _probe_tests}[spec["mode"]]
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
