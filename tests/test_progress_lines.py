"""Every long command family prints plain progress lines in a log (nohup, pueue).

Each command runs as a real process with its output redirected to a file, as under
`nohup persona-cli ... > log 2>&1` (stderr is not a terminal, so no live bar renders), with
PERSONA_CLI_PROGRESS_EVERY=0 so each update prints (the default is one line every 30 s and one
when a task ends). The log must hold `LABEL[ TASK]: DONE/TOTAL UNIT` lines ending at TOTAL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LINE = re.compile(r"^(?P<name>[a-z][a-z -]*?): (?P<done>\d+)/(?P<total>\d+) (?P<unit>[a-z]+)")


def _run_logged(args: list[str], log: Path, home: Path) -> str:
    env = {
        **os.environ,
        "PERSONA_CLI_HOME": str(home),
        "PERSONA_CLI_PROGRESS_EVERY": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "persona_cli", *map(str, args)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=600,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def _progress(text: str) -> dict[str, list[tuple[int, int, str]]]:
    found: dict[str, list[tuple[int, int, str]]] = {}
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            found.setdefault(m["name"], []).append((int(m["done"]), int(m["total"]), m["unit"]))
    return found


@pytest.fixture(scope="module")
def work(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("progress")
    chat = root / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A"}]}
        for i in range(4)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = root / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "question": "Is it safe?", "answer": "Yes."}) + "\n"
            for i in range(3)
        )
    )
    return {"root": root, "chat": chat, "answers": answers, "home": prepared_home}


FAMILIES = {
    "training": (
        "train-sft --model tiny-random --data {chat} --max-steps 2 --per-device-batch 2 "
        "--grad-accum 1 --lora-r 4 --max-length 32",
        {"train-sft": "steps"},
    ),
    "marker evaluation": (
        "eval-markers --model tiny-random --personas-ids assistant,villain --samples 1 "
        "--max-new-tokens 2",
        {"eval-markers": "completions"},
    ),
    "capability evaluation": (
        "eval-capability --model tiny-random --limit 4",
        {"eval-capability": "items"},
    ),
    "judging": (
        "judge-align --input {answers} --backend local --judge-model tiny-random --id-column id",
        {"judge-align": "readings"},
    ),
    "trace replay": (
        "replay-trace run --student s=local:tiny-random --teacher t=local:tiny-random --limit 2",
        {"replay-trace student s": "prompts", "replay-trace teacher t": "prompts"},
    ),
    "reward-hack probe": (
        "probe teacher-pool --model tiny-random --n-problems 1 -g 2 --steps 1 --max-new-tokens 4",
        {"probe teacher-pool generated": "completions", "probe teacher-pool graded": "completions"},
    ),
    "persona geometry": (
        "persona-vectors extract --model tiny-random --persona-ids assistant,villain "
        "--limit-questions 2 --method prompt-last",
        {"persona-vectors extract prompt-last": "sequences"},
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_logged_run_shows_progress_lines(work: dict[str, Path], family: str) -> None:
    template, expected = FAMILIES[family]
    args = template.format(**{k: str(v) for k, v in work.items()}).split()
    out = work["root"] / family.replace(" ", "_")
    text = _run_logged([*args, "--out", out], work["root"] / f"{out.name}.log", work["home"])
    found = _progress(text)
    for name, unit in expected.items():
        assert name in found, f"{family}: no '{name}:' progress line in\n{text[-2000:]}"
        lines = found[name]
        assert all(u == unit for _, _, u in lines), lines
        done, total, _ = lines[-1]
        assert done == total and total > 0, lines  # the last line says the task finished
        assert [d for d, _, _ in lines] == sorted(d for d, _, _ in lines)  # never backwards


def test_threads_advancing_one_task_lose_no_count_and_never_go_backwards(monkeypatch) -> None:
    """The graders of `probe teacher-pool` advance from sandbox threads: 8 threads x 250
    advances end at 2000/2000, and the printed counts only grow (a 2/2 line followed by 1/2 was
    seen in CI before the display took a lock)."""
    import io
    import threading

    from rich.console import Console

    from persona_cli.cli import console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "err_console", Console(file=buffer, force_terminal=False))
    monkeypatch.setenv("PERSONA_CLI_PROGRESS_EVERY", "0")
    display = console.ProgressDisplay("probe teacher-pool")
    display.begin("graded", total=2000, unit="completions")
    start = threading.Barrier(8)

    def grade() -> None:
        start.wait()
        for _ in range(250):
            display.advance("graded", 1)

    threads = [threading.Thread(target=grade) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _progress(buffer.getvalue())["probe teacher-pool graded"]
    done = [d for d, _, _ in lines]
    assert done == sorted(done) and done[-1] == 2000 and len(done) == 2000
