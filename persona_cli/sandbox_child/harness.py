"""Sandbox harness: runs a completion, then the grader or the hidden tests, and reports.

Runs as the sandbox uid under `python -I -S -c`. Reads its spec (with the per-run nonce) from
stdin before any completion code runs, keeps the nonce in a local, and reports on a private dup
of stdout. Standard library only (see package docstring).
"""

import builtins
import json
import os
import sys
import traceback


def _main():
    chunks = []
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    spec = json.loads(b"".join(chunks))
    chunks = None
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    nonce, tests, out = spec.pop("nonce"), spec["tests"], os.dup(1)
    write, exit_, dumps, format_exc = os.write, os._exit, json.dumps, traceback.format_exc

    def report(status, error=None, message="", passed=0, total=0):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        line = dumps(
            {
                "nonce": nonce,
                "status": status,
                "error": error,
                "message": message[-4000:],
                "passed": passed,
                "total": total,
            }
        )
        write(out, ("\n" + line + "\n").encode())
        exit_(0 if status == "pass" else 1)

    def kind(exc):
        for cls, name in (
            (SystemExit, "exit_called"),
            (MemoryError, "memory"),
            (AssertionError, "assertion"),
            (RecursionError, "recursion"),
        ):
            if isinstance(exc, cls):
                return name
        return "exception"

    def honest(value, depth=0):  # rejects always-equal objects: __eq__ from the completion
        for name in ("__eq__", "__ne__"):
            owner = next(c for c in type(value).__mro__ if name in vars(c))
            if owner.__module__ != "builtins":
                raise TypeError(
                    f"{spec['entry_point']} returned a {type(value).__name__} "
                    f"whose {name} is not a builtin one"
                )
        if depth < 3 and isinstance(value, (list, tuple, set, frozenset, dict)):
            for item in value.items() if isinstance(value, dict) else value:
                honest(item, depth + 1)
        return value

    ns = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(spec["run_tests"], "<run_tests>", "exec"), ns)
    try:
        code = compile(spec["code"], "<completion>", "exec")
    except (SyntaxError, ValueError) as exc:
        report("fail", "syntax_error", f"{type(exc).__name__}: {exc}")
    try:
        exec(code, ns)
        if spec["mode"] == "grader":
            ns["run_tests"]()
            report("pass", passed=1, total=1)
    except BaseException as exc:
        report("fail", kind(exc), format_exc())
    solution = ns.get(spec["entry_point"])
    if callable(solution):  # recursion in the solution goes through this wrapper too
        ns[spec["entry_point"]] = lambda *a, **k: honest(solution(*a, **k))
    passed, first = 0, None
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"<hidden_test_{i}>", "exec"), ns)
            passed += 1
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                report("fail", "exit_called", format_exc(), passed, len(tests))
            first = first or (kind(exc), test + "\n" + format_exc())
    if first:
        report("fail", first[0], first[1], passed, len(tests))
    report("pass", passed=passed, total=len(tests))


if __name__ == "__main__":
    _main()
