"""Consoles shared by the commands: results go to stdout, logs and progress to stderr."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import ProgressColumn, Task
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


class PlainProgressLog:
    """Progress for logs: where stderr is not a terminal (nohup, pueue, CI) a live rich bar does
    not render, so print one plain line every `every` seconds and when the task finishes."""

    def __init__(self, label: str, unit: str, every: float = 30.0):
        self.label, self.unit, self.every = label, unit, every
        self.last = time.monotonic()

    def __call__(self, task: Task) -> None:
        if err_console.is_terminal or task.total is None:
            return
        now = time.monotonic()
        if now - self.last < self.every and not task.finished:
            return
        self.last = now
        done = task.completed - task.fields.get("resumed_from", 0)
        rate = f", {done / task.elapsed:.2f} {self.unit}/s" if task.elapsed and done > 0 else ""
        err_console.print(
            f"{self.label}: {int(task.completed)}/{int(task.total)} {self.unit}{rate}",
            highlight=False,
        )


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
