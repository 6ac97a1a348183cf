"""Trainer callbacks: the per-step training log and a progress hook the command layer supplies.

`train_log.jsonl.gz` has one row per optimizer step (step, loss, lr, grad_norm, tokens seen in
the step and in total, epoch). The rows are derived from the Trainer's `log_history`, which every
checkpoint stores and a resumed run restores, so the log of a resumed run is whole. The file is
rewritten (atomically) at each checkpoint and at the end.

The library never prints: a command passes an object with `start(total, completed)`,
`advance(completed, row)` and `finish()` (a rich progress bar in `persona_cli.cli.train`), and
`ProgressCallback` forwards the Trainer's events to it. `SaveAtCallback` keeps the adapter of
chosen steps (`--save-at`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from persona_cli.artifacts import write_jsonl
from persona_cli.schemas import TRAIN_LOG as TRAIN_LOG_SCHEMA

TRAIN_LOG = "train_log.jsonl.gz"


class StepProgress(Protocol):
    def start(self, total: int, completed: int) -> None: ...
    def advance(self, completed: int, row: dict[str, Any] | None) -> None: ...
    def finish(self) -> None: ...


def log_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step (logging_steps=1: every optimizer step)."""
    rows = []
    previous_total = 0
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue  # the closing train_runtime entry, eval entries
        total = int(entry.get("num_input_tokens_seen", 0))
        rows.append(
            {
                "step": int(entry["step"]),
                "loss": float(entry["loss"]),
                "lr": float(entry["learning_rate"]),
                "grad_norm": None if entry.get("grad_norm") is None else float(entry["grad_norm"]),
                "tokens": total - previous_total,
                "tokens_total": total,
                "epoch": float(entry.get("epoch", 0.0)),
            }
        )
        previous_total = total
    return rows


def write_train_log(path: Path, log_history: list[dict[str, Any]]) -> int:
    return write_jsonl(path, log_rows(log_history), schema_version=TRAIN_LOG_SCHEMA.version)


class TrainLogCallback(TrainerCallback):
    """Rewrites RUN/train_log.jsonl.gz after every checkpoint (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_train_log(self.path, state.log_history)


class ProgressCallback(TrainerCallback):
    """Forwards training progress to a `StepProgress` (main process only)."""

    def __init__(self, progress: StepProgress):
        self.progress = progress

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress.start(state.max_steps, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs and "loss" in logs:
            rows = log_rows([{**logs, "step": state.global_step}])
            self.progress.advance(state.global_step, rows[0] if rows else None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress.finish()


class SaveAtCallback(TrainerCallback):
    """Saves the adapter after each optimizer step in `steps` as `directory(step)` (PEFT files;
    main process only), written to a scratch directory and renamed, so a kill leaves the old
    one or none. The training recipe adds the persona-cli adapter record once the run is done."""

    def __init__(self, steps: tuple[int, ...], directory: Any):
        self.steps = set(steps)
        self.directory = directory

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step not in self.steps or not state.is_world_process_zero:
            return
        final = Path(self.directory(state.global_step))
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs["model"].save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
