"""The one progress protocol: long loops in the library report here; the CLI renders it.

A library function that runs long takes `progress: Progress = NO_PROGRESS` and reports each unit
of work against a named task:

    progress.begin("judging", total=len(rows), done=already_cached, unit="rows")
    for ...:
        progress.advance("judging", 1)
    progress.update("training", completed=step, status=f"loss {loss:.4f}")

`done` is work found finished on disk (a resumed run): it fills the bar but is not counted in
this run's rate. The CLI's display (`persona_cli.cli.console.ProgressDisplay`) is a live rich bar
on a terminal and a plain line every 30 s (and at the end of each task) in a log, so nohup and
pueue logs show where a run is. The library never prints.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, key: str, total: int, *, done: int = 0, unit: str = "items") -> None:
        """Start (or restart) task `key`: `total` units, `done` of them already done."""

    def advance(self, key: str, n: int = 1, *, status: str = "") -> None:
        """`n` more units of `key` are done; `status` is a short note (loss, reward)."""

    def update(self, key: str, completed: int, *, status: str = "") -> None:
        """`completed` units of `key` are done in all."""


class NoProgress:
    """Reports nowhere (the default of library functions, and of non-main processes)."""

    def begin(self, key: str, total: int, *, done: int = 0, unit: str = "items") -> None:
        pass

    def advance(self, key: str, n: int = 1, *, status: str = "") -> None:
        pass

    def update(self, key: str, completed: int, *, status: str = "") -> None:
        pass


NO_PROGRESS: Progress = NoProgress()
