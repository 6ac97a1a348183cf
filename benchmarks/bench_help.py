"""`persona-cli --help` and `persona-cli CMD --help` start-up time, two trees side by side.

    python benchmarks/bench_help.py --tree before=/path/to/old/checkout --tree after=. --rounds 7

Each round runs every (tree, command) once, in alternating order, as a fresh process
(`python -m persona_cli ... --help`, output discarded), with PYTHONPATH set to the tree; the
figures are the median wall time and the median CPU time (user + system of the child) per
(tree, command); CPU time is the one to read on a loaded machine. Also lists which heavy
packages importing `persona_cli.cli` loads in each tree. Writes the BENCHMARKS.md section
with --write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, git_commit, load_average, publish

COMMANDS = (["--help"], ["eval-markers", "--help"], ["train-sft", "--help"])
HEAVY = ("torch", "numpy", "scipy", "statsmodels", "transformers", "matplotlib", "httpx")


def _time(tree: Path, args: list[str]) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "100"}
    t0, c0 = time.perf_counter(), os.times()
    # cwd = the tree: `python -m` puts the working directory first on sys.path.
    subprocess.run(
        [sys.executable, "-m", "persona_cli", *args],
        env=env,
        cwd=tree,
        check=True,
        capture_output=True,
    )
    c1 = os.times()
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return time.perf_counter() - t0, cpu


def _heavy(tree: Path) -> list[str]:
    code = "import sys, persona_cli.cli; print(' '.join(m for m in %r if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code % (HEAVY,)], env=env, cwd=tree, check=True, capture_output=True
    )
    return out.stdout.decode().split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH; repeat")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    load_start = load_average()
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for name, path in order:
            for cmd in COMMANDS:
                times.setdefault((name, " ".join(cmd)), []).append(_time(Path(path), cmd))
    load_end = load_average()
    lines = [
        "## Start-up: `persona-cli --help`",
        "",
        f"- command: `python benchmarks/bench_help.py {' '.join('--tree ' + t for t in args.tree)}"
        f" --rounds {args.rounds}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; load average {load_start} at the "
        f"start, {load_end} at the end",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, git {git_commit()}",
        "",
        "| tree | command | median wall s | median CPU s | all runs, wall (s) |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for (name, cmd), ts in times.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        runs = ", ".join(f"{w:.2f}" for w in walls)
        lines.append(
            f"| {name} | `persona-cli {cmd}` | {statistics.median(walls):.2f} | "
            f"{statistics.median(cpus):.2f} | {runs} |"
        )
    lines.append("")
    for name, path in trees.items():
        heavy = _heavy(Path(path))
        lines.append(
            f"- {name}: importing persona_cli.cli loads {', '.join(heavy) or 'none of'}"
            f" {'' if heavy else ', '.join(HEAVY)}".rstrip()
        )
    publish("bench_help", lines, write=args.write)


if __name__ == "__main__":
    main()
