"""Consoles shared by the commands: results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error line must stay one line


# Seconds between plain progress lines in a log (nohup, pueue, CI); tests set it to 0.
LOG_EVERY_ENV = "PERSONA_CLI_PROGRESS_EVERY"


def log_every() -> float:
    return float(os.environ.get(LOG_EVERY_ENV, "30"))


class UnitRateColumn(ProgressColumn):
    """Units per second since the task started, work found done on disk not counted."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("resumed_from", 0)
        unit = task.fields.get("unit", "items")
        if not task.elapsed or done <= 0:
            return Text(f"-- {unit}/s", style="cyan")
        return Text(f"{done / task.elapsed:.2f} {unit}/s", style="cyan")


@dataclass
class _Plain:
    """A task's state for the plain log lines."""

    total: int
    done: int
    unit: str
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    completed: int = 0
    status: str = ""
    finished_printed: bool = False


class ProgressDisplay:
    """The CLI side of `persona_cli.progress.Progress`: a live rich bar per task on a terminal;
    where stderr is not a terminal, one plain line per task every `PERSONA_CLI_PROGRESS_EVERY`
    seconds (30) and when it finishes (a command's only task has the key ""):

        judge-align: 120/480 readings, 3.10 readings/s, 1 min 56 s left
        probe teacher-pool graded: 64/64 completions, 1.52 completions/s

    The bar starts at the first task with work left, so a finished run prints no empty bar.
    Libraries may advance a task from worker threads (the graders of `probe teacher-pool`), so
    every change and the line it prints happen under one lock: counts are never lost and a
    task's lines never go backwards.
    """

    def __init__(self, label: str):
        self.label = label
        self.live = err_console.is_terminal
        self.every = log_every()
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            UnitRateColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.tasks: dict[str, Any] = {}
        self.plain: dict[str, _Plain] = {}
        self.started = False
        self.lock = threading.RLock()

    def begin(self, key: str, total: int, *, done: int = 0, unit: str = "items") -> None:
        with self.lock:
            self._begin(key, total, done, unit)

    def _begin(self, key: str, total: int, done: int, unit: str) -> None:
        fields = {"resumed_from": done, "unit": unit, "status": ""}
        if key in self.tasks:
            self.bar.reset(self.tasks[key], total=total, completed=done, **fields)
        else:
            description = f"{self.label} {key}" if key else self.label
            self.tasks[key] = self.bar.add_task(description, total=total, completed=done, **fields)
        self.plain[key] = _Plain(total=total, done=done, unit=unit, completed=done)
        if self.live and not self.started and done < total:
            self.bar.start()
            self.started = True

    def advance(self, key: str, n: int = 1, *, status: str = "") -> None:
        with self.lock:
            self._update(key, self.plain[key].completed + n, status)

    def update(self, key: str, completed: int, *, status: str = "") -> None:
        with self.lock:
            self._update(key, completed, status)

    def _update(self, key: str, completed: int, status: str) -> None:
        state = self.plain[key]
        state.completed = completed
        if status:
            state.status = status
        self.bar.update(self.tasks[key], completed=completed, status=state.status)
        if not self.live:
            self._plain_line(key, state)

    def _plain_line(self, key: str, state: _Plain) -> None:
        now = time.monotonic()
        finished = state.completed >= state.total
        if finished and state.finished_printed:
            return
        if not finished and now - state.last_line < self.every:
            return
        state.last_line = now
        state.finished_printed = finished
        work = state.completed - state.done
        elapsed = now - state.started
        parts = [f"{state.completed}/{state.total} {state.unit}"]
        if work > 0 and elapsed > 0:
            rate = work / elapsed
            parts.append(f"{rate:.2f} {state.unit}/s")
            if not finished:
                parts.append(f"{_duration((state.total - state.completed) / rate)} left")
        if state.status:
            parts.append(state.status)
        name = f"{self.label} {key}" if key else self.label
        err_console.print(f"{name}: {', '.join(parts)}", highlight=False)

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:  # a Progress never started would still print a blank line
            self.bar.stop()


def _duration(left: float) -> str:
    seconds = round(left)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
