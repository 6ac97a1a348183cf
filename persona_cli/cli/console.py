"""Consoles shared by the commands: results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
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


class RateColumn(ProgressColumn):
    """Completions per second since the task started. Not rich's windowed speed: vLLM reports
    a whole request's K samples at once, and those bursts make a short window meaningless. A
    task's `resumed_from` field (work found done on disk) is not counted as this run's work."""

    def render(self, task: Task) -> Text:
        done = task.completed - task.fields.get("resumed_from", 0)
        if not task.elapsed or done <= 0:
            return Text("-- compl/s", style="cyan")
        return Text(f"{done / task.elapsed:.2f} compl/s", style="cyan")


class LogThrottle:
    """When to print a plain progress line: only where stderr is not a terminal (nohup, pueue,
    CI: a live rich bar does not render there), every `every` seconds and at the end."""

    def __init__(self, every: float = 30.0):
        self.every = every
        self.last = time.monotonic()

    def due(self, finished: bool) -> bool:
        if err_console.is_terminal:
            return False
        now = time.monotonic()
        if now - self.last < self.every and not finished:
            return False
        self.last = now
        return True


class PlainProgressLog:
    """One plain line `LABEL: DONE/TOTAL UNIT, RATE UNIT/s` per `LogThrottle` tick of a task."""

    def __init__(self, label: str, unit: str, every: float = 30.0):
        self.label, self.unit = label, unit
        self.throttle = LogThrottle(every)

    def __call__(self, task: Task) -> None:
        if task.total is None or not self.throttle.due(task.finished):
            return
        done = task.completed - task.fields.get("resumed_from", 0)
        rate = f", {done / task.elapsed:.2f} {self.unit}/s" if task.elapsed and done > 0 else ""
        err_console.print(
            f"{self.label}: {int(task.completed)}/{int(task.total)} {self.unit}{rate}",
            highlight=False,
        )


class CompletionBar:
    """A resume-aware bar of completions on stderr, one row per kind of work ("generating", or
    "generated" and "graded"), with a plain log line per kind where no live bar renders.

    `plan(total, remaining)` starts the bar only when there is work (a finished run prints no
    empty bar) and counts work found done on disk as resumed, not as this run's rate.
    """

    def __init__(self, kinds: Sequence[str], log_label: str, unit: str = "completions"):
        width = max(len(k) for k in kinds)
        self.bar = Progress(
            TextColumn(f"{{task.description:<{width}}}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.tasks = {k: self.bar.add_task(k, total=None) for k in kinds}
        self.logs = {
            k: PlainProgressLog(log_label if len(kinds) == 1 else f"{log_label} {k}", unit)
            for k in kinds
        }

    def plan(self, total: int, remaining: int) -> None:
        done = total - remaining
        for task in self.tasks.values():
            self.bar.reset(task, total=total, completed=done, resumed_from=done)
        if remaining:
            self.bar.start()

    def advance(self, kind: str, n: int) -> None:
        task = self.tasks[kind]
        self.bar.advance(task, n)
        self.logs[kind](self.bar.tasks[task])

    def __enter__(self) -> CompletionBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


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
    seconds (30) and when it finishes:

        judge-align judging: 120/480 rows, 3.10 rows/s, 1 min 56 s left

    The bar starts at the first task with work left, so a finished run prints no empty bar.
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

    def begin(self, key: str, total: int, *, done: int = 0, unit: str = "items") -> None:
        fields = {"resumed_from": done, "unit": unit, "status": ""}
        if key in self.tasks:
            self.bar.reset(self.tasks[key], total=total, completed=done, **fields)
        else:
            self.tasks[key] = self.bar.add_task(key, total=total, completed=done, **fields)
        self.plain[key] = _Plain(total=total, done=done, unit=unit, completed=done)
        if self.live and not self.started and done < total:
            self.bar.start()
            self.started = True

    def advance(self, key: str, n: int = 1, *, status: str = "") -> None:
        self.update(key, self.plain[key].completed + n, status=status)

    def update(self, key: str, completed: int, *, status: str = "") -> None:
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
        name = key if key.startswith(self.label) else f"{self.label} {key}"
        err_console.print(f"{name}: {', '.join(parts)}", highlight=False)

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
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
