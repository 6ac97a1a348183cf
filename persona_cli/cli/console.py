"""Consoles shared by the commands: results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import time
from collections.abc import Sequence

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


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
