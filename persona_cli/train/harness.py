"""LoRA SFT through TRL's SFTTrainer + PEFT, on a pre-tokenised, pre-masked dataset.

`train_lora` loads the base model (earlier adapters of a stack merged into it in memory), wraps
it with a fresh LoRA adapter, trains with checkpoints under RUN/checkpoints (adapter + optimizer,
scheduler and RNG state; a re-run resumes from the last one), and saves the final adapter to
RUN/adapter. Out of GPU memory, it retries once with half the per-device batch and twice the
accumulation, so the effective batch is unchanged, and reports the retry. With `save_at` the
adapters of those steps stay as RUN/checkpoints/step_N (`SaveAtCallback`, added by the run
lifecycle).

Runs unchanged under `accelerate launch --num_processes N` (the Trainer shards the batches;
only the main process saves).

    result = train_lora(model=resolved, stack=[], tokenizer=tok, data=tokenized, cfg=TrainConfig(),
                        run_path=Path("runs/x"), callbacks=[])
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.adapters import CHECKPOINTS, Adapter, load_with_adapters
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.models import ResolvedModel
from persona_cli.train.callbacks import TRAIN_LOG, TrainLogCallback, log_rows, write_train_log
from persona_cli.train.config import TrainConfig
from persona_cli.train.dataset import TokenizedSet
from persona_cli.train.lm_head import add_loss_position_head

log = logging.getLogger(__name__)

ADAPTER = "adapter"


@dataclass(frozen=True)
class TrainResult:
    protocol: BatchProtocol
    oom_retry: dict[str, Any] | None
    resumed_from: str | None
    final_loss: float | None
    dtype: str
    train_seconds: float
    is_main: bool
    logits_at: str  # where the LM head ran: "loss" positions only, or "all" positions

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.to_dict(),
            "logits_at": self.logits_at,
            "oom_retry": self.oom_retry,
            "resumed_from": self.resumed_from,
            "final_loss": self.final_loss,
            "dtype": self.dtype,
            "train_seconds": self.train_seconds,
        }


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def rank_device() -> str:
    # Each process of a multi-GPU launch loads onto its own GPU, not all onto cuda:0.
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if on_gpu() else "cpu"


def resolved_dtype(cfg: TrainConfig) -> str:
    if cfg.dtype == "auto":
        return "bfloat16" if on_gpu() else "float32"  # fp32 is several times faster on CPUs
    return cfg.dtype


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainer_kwargs(
    cfg: TrainConfig, output_dir: Path, per_device_batch: int, grad_accum: int
) -> dict[str, Any]:
    """The TrainingArguments every LoRA trainer shares (SFT, DPO): schedule, optimizer,
    precision, checkpoints, logging. Each method adds its own fields."""
    dtype = resolved_dtype(cfg)
    checkpointing = cfg.gradient_checkpointing == "on" or (
        cfg.gradient_checkpointing == "auto" and on_gpu()
    )
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == "bfloat16",  # TRL defaults bf16 to True; fp32 runs must say so
        fp16=dtype == "float16",
        gradient_checkpointing=checkpointing,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu(),
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


def trainer_args(cfg: TrainConfig, output_dir: Path, per_device_batch: int, grad_accum: int) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_kwargs(cfg, output_dir, per_device_batch, grad_accum),
        # Masks and truncation were applied when tokenising; TRL only folds the mask into labels.
        max_length=None,
        padding_free=cfg.padding_free,
        include_num_input_tokens_seen="all" if cfg.padding_free else "non_padding",
    )


def last_checkpoint(run_path: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes a checkpoint in place and its
    trainer_state.json last, so a checkpoint without a parsable one was cut by a kill."""
    directory = run_path / CHECKPOINTS
    if not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    for _, p in sorted(found, reverse=True):
        try:
            json.loads((p / "trainer_state.json").read_text())
            return str(p)
        except (OSError, ValueError):
            log.warning("ignoring incomplete checkpoint %s", p)
    return None


def _fit(trainer: Any, resume_from: str | None) -> Any:
    """One call of the training loop (the seam the OOM-retry test injects failures into)."""
    return trainer.train(resume_from_checkpoint=resume_from)


def quiet_progress_bars() -> None:
    # transformers (weight loading) and datasets (label building) draw tqdm bars on stderr;
    # the command layer shows its own progress instead.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_once(
    *,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    data: TokenizedSet,
    cfg: TrainConfig,
    run_path: Path,
    callbacks: list[Any],
    per_device_batch: int,
    grad_accum: int,
) -> tuple[Any, str | None]:
    from trl import SFTTrainer

    def build() -> Any:
        trainer = SFTTrainer(
            model=load_with_adapters(model, stack, dtype=resolved_dtype(cfg), device=rank_device()),
            args=trainer_args(cfg, run_path / CHECKPOINTS, per_device_batch, grad_accum),
            train_dataset=data.to_dataset(),
            processing_class=tokenizer,
            peft_config=lora_config(cfg),
            callbacks=[TrainLogCallback(run_path / TRAIN_LOG), *callbacks],
        )
        trainer.logits_at = "all"
        if cfg.logits_at == "loss" and add_loss_position_head(trainer.model.get_base_model()):
            trainer.logits_at = "loss"
        return trainer

    return fit_resuming(build, run_path)


def fit_resuming(build: Callable[[], Any], run_path: Path) -> tuple[Any, str | None]:
    """Build a trainer and train it, resuming from the newest complete checkpoint under
    RUN/checkpoints when there is one. Returns the trainer and that checkpoint."""
    from transformers import PrinterCallback

    trainer = build()
    trainer.remove_callback(PrinterCallback)  # it prints log dicts; the library never prints
    resume_from = last_checkpoint(run_path)
    if resume_from:
        log.info("resuming from %s", resume_from)
    try:
        _fit(trainer, resume_from)
    except BaseException:
        del trainer  # nothing of the model may stay alive for an OOM retry
        raise
    return trainer, resume_from


@dataclass(frozen=True)
class Fitted:
    trainer: Any
    resumed_from: str | None
    per_device_batch: int
    grad_accum: int
    oom_retry: dict[str, Any] | None


def fit_with_oom_retry(
    cfg: TrainConfig, once: Callable[[int, int], tuple[Any, str | None]]
) -> Fitted:
    """`once(per_device_batch, grad_accum)` builds and fits a trainer; out of GPU memory it is
    called once more with half the batch and twice the accumulation (same effective batch)."""
    import torch

    per_device_batch, grad_accum = cfg.per_device_batch, cfg.grad_accum
    oom_retry: dict[str, Any] | None = None
    while True:
        try:
            trainer, resumed_from = once(per_device_batch, grad_accum)
            return Fitted(trainer, resumed_from, per_device_batch, grad_accum, oom_retry)
        except torch.cuda.OutOfMemoryError as e:
            free_memory()
            if oom_retry is not None or per_device_batch % 2:
                raise UserError(
                    f"out of GPU memory at --per-device-batch {per_device_batch} x --grad-accum "
                    f"{grad_accum}"
                    + (" after one retry" if oom_retry else " (odd batch: cannot halve it)")
                    + "; lower --per-device-batch or --max-length, or pass "
                    "--gradient-checkpointing on"
                ) from None
            oom_retry = {
                "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
                "from": {"per_device_batch": per_device_batch, "grad_accum": grad_accum},
                "to": {"per_device_batch": per_device_batch // 2, "grad_accum": grad_accum * 2},
            }
            log.warning(
                "out of GPU memory; retrying once with per-device batch %d x accumulation %d "
                "(same effective batch)",
                per_device_batch // 2,
                grad_accum * 2,
            )
            per_device_batch, grad_accum = per_device_batch // 2, grad_accum * 2


def save_adapter(
    fitted: Fitted,
    *,
    cfg: TrainConfig,
    run_path: Path,
    started: float,
    write_log: Callable[[Path, list[dict[str, Any]]], int] = write_train_log,
    logits_at: str = "all",
) -> TrainResult:
    """Save RUN/adapter and the train log, drop the checkpoints, and describe the protocol the
    run trained with. `write_log(path, log_history)` writes RUN/train_log.jsonl.gz; `logits_at`
    says where the LM head ran (see persona_cli.train.lm_head)."""
    trainer = fitted.trainer
    state = trainer.state
    protocol = BatchProtocol(
        per_device_batch=fitted.per_device_batch,
        grad_accum=fitted.grad_accum,
        world_size=trainer.accelerator.num_processes,
        optimizer_steps=state.global_step,
    )
    rows = log_rows(state.log_history)
    is_main = bool(state.is_world_process_zero)
    trainer.save_model(str(run_path / ADAPTER))  # PEFT weights; the main process writes
    if is_main:
        write_log(run_path / TRAIN_LOG, state.log_history)
        if not cfg.keep_checkpoints:  # the Trainer's files go; --save-at's step_N stay
            directory = run_path / CHECKPOINTS
            for entry in directory.iterdir() if directory.is_dir() else []:
                if not entry.name.startswith("step_"):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    return TrainResult(
        protocol=protocol,
        oom_retry=fitted.oom_retry,
        resumed_from=fitted.resumed_from,
        final_loss=rows[-1]["loss"] if rows else None,
        dtype=resolved_dtype(cfg),
        train_seconds=round(time.monotonic() - started, 3),
        is_main=is_main,
        logits_at=logits_at,
    )


def train_lora(
    *,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    data: TokenizedSet,
    cfg: TrainConfig,
    run_path: Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one LoRA adapter; returns the protocol it ran with. See the module doc."""
    quiet_progress_bars()
    started = time.monotonic()
    fitted = fit_with_oom_retry(
        cfg,
        lambda per_device_batch, grad_accum: _train_once(
            model=model,
            stack=stack,
            tokenizer=tokenizer,
            data=data,
            cfg=cfg,
            run_path=run_path,
            callbacks=list(callbacks or []),
            per_device_batch=per_device_batch,
            grad_accum=grad_accum,
        ),
    )
    result = save_adapter(
        fitted, cfg=cfg, run_path=run_path, started=started, logits_at=fitted.trainer.logits_at
    )
    del fitted
    free_memory()
    return result
