"""Experiment tracking (`--report-to wandb`): a run directory mirrored to a wandb run.

The run directory stays the record; wandb is a view of it that the research log missed when run
ids were lost. When a command is given `--report-to wandb`, the CLI activates a `WandbTracker`
for the duration of the library call (`with tracking.active(tracker): ...`); then

- `rundir.open_run` starts a wandb run named after the run directory, with the command as its
  job type and the run's config.json `config` as the wandb config;
- a training run logs each optimizer step's train-log row (`tracking.StepLogger`, a Trainer
  callback), live;
- `RunDir.finish` logs the summary's numeric figures (summary.json or train_summary.json,
  flattened to dotted keys) as the wandb summary, finishes the wandb run, and writes its id,
  URL, project and mode into the manifest as `tracking`.

wandb is an optional extra (`pip install 'persona-cli[wandb]'`); `WANDB_MODE=offline` works
without network (the run files are written under `WANDB_DIR`, default ./wandb). An API key is
read by wandb from its own environment and never recorded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from persona_cli.errors import UserError

REPORT_TO = ("none", "wandb")
DEFAULT_PROJECT = "persona-cli"
INSTALL_HINT = "pip install 'persona-cli[wandb]'"

_ACTIVE: ContextVar[WandbTracker | None] = ContextVar("persona_cli_tracker", default=None)


def flatten_numbers(doc: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document as {"a.b.c": value} (bools and nulls left out)."""
    out: dict[str, float] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


class WandbTracker:
    """One wandb run per run directory opened while it is active."""

    def __init__(self, project: str | None = None):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                f"--report-to wandb: the wandb package is not installed ({INSTALL_HINT})"
            ) from None
        self.project = project or os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)
        self.run: Any = None
        self.logged_steps = 0

    def start(self, run_dir: Path, command: str, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            name=run_dir.resolve().name,
            job_type=command,
            config=dict(config),
            reinit="finish_previous",
            dir=os.environ.get("WANDB_DIR"),
        )
        self.logged_steps = 0

    def log_step(self, row: Mapping[str, Any]) -> None:
        """One train-log row, at its optimizer step."""
        if self.run is None:
            return
        values = {k: v for k, v in flatten_numbers(row).items() if k != "step"}
        self.run.log(values, step=int(row["step"]))
        self.logged_steps += 1

    def finish(self, summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Write the summary figures, end the wandb run; the manifest's `tracking` record."""
        if self.run is None:
            return None
        run, self.run = self.run, None
        if summary:
            run.summary.update(flatten_numbers(summary))
        record = {
            "backend": "wandb",
            "run_id": run.id,
            "url": run.url,
            "project": run.project,
            "mode": run.settings.mode,
            "steps_logged": self.logged_steps,
        }
        run.finish()
        return record


def current() -> WandbTracker | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def active(tracker: WandbTracker | None) -> Iterator[None]:
    """Make `tracker` the one run directories report to (None: no tracking)."""
    token = _ACTIVE.set(tracker)
    try:
        yield
    finally:
        if tracker is not None and tracker.run is not None:  # the run failed before finish
            tracker.run.finish(exit_code=1)
            tracker.run = None
        _ACTIVE.reset(token)


def tracker_for(report_to: str) -> WandbTracker | None:
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    return WandbTracker() if report_to == "wandb" else None
