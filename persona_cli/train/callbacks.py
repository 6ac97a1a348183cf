"""Trainer callbacks: the per-step training log and a progress hook the command layer supplies.

`train_log.jsonl.gz` has one row per optimizer step (step, loss, lr, grad_norm, tokens seen in
the step and in total, epoch). The rows are derived from the Trainer's `log_history`, which every
checkpoint stores and a resumed run restores, so the log of a resumed run is whole. The file is
rewritten (atomically) at each checkpoint and at the end.

The library never prints: `ProgressCallback` reports optimizer steps to a
`persona_cli.progress.Progress` (the command's display), with a status line made from each
logged step (loss and lr for SFT/DPO; reward and loss for GRPO, see `train.rl_log`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from persona_cli import tracking
from persona_cli.artifacts import write_jsonl
from persona_cli.progress import Progress
from persona_cli.schemas import TRAIN_LOG as TRAIN_LOG_SCHEMA

TRAIN_LOG = "train_log.jsonl.gz"


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


def sft_row(logs: dict[str, Any], state: Any) -> dict[str, Any] | None:
    """The train-log row of one logged SFT/DPO step."""
    rows = log_rows([{**logs, "step": state.global_step}])
    return rows[0] if rows else None


def loss_status(row: dict[str, Any]) -> str:
    """`loss 0.1234  lr 1.00e-04` of one SFT/DPO row."""
    return f"loss {row['loss']:.4f}  lr {row['lr']:.2e}"


class ProgressCallback(TrainerCallback):
    """The one logging/progress callback of every trainer (main process only): optimizer steps
    as the task `key` of a `Progress` with a status note, and each step's row to the active
    experiment tracker (`persona_cli.tracking`, `--report-to wandb`). `row` turns the Trainer's
    logs into the step's train-log row, `status` a row into the note."""

    def __init__(
        self,
        progress: Progress,
        key: str = "",
        row: Callable[[dict[str, Any], Any], dict[str, Any] | None] = sft_row,
        status: Callable[[dict[str, Any]], str] = loss_status,
    ):
        self.progress, self.key, self.row, self.status = progress, key, row, status

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.progress.begin(self.key, state.max_steps, done=state.global_step, unit="steps")

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and logs and "loss" in logs):
            return
        row = self.row(logs, state)
        self.progress.update(self.key, state.global_step, status=self.status(row) if row else "")
        tracker = tracking.current()
        if tracker is not None and row is not None:
            tracker.log_step(row)
