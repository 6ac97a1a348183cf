"""LoRA DPO through TRL's DPOTrainer, on preference pairs rendered by the chat-template guard.

Pairs are `{prompt, chosen, rejected}` rows (schema `pairs`): `prompt` a user string or chat
messages ending with the user's turn, `chosen`/`rejected` strings or assistant message lists,
so the `pairs.jsonl.gz` that `replay-trace run` writes is read unchanged. Every prompt goes
through the guard (`--system-prompt`) before TRL renders it with the chat template, so a
template's injected default system prompt never slips in unseen.

The starting policy is the base model with the earlier stages' adapters merged in memory (or a
merged model directory); a fresh LoRA adapter is trained on top of it and the reference model is
that same starting policy (the adapter disabled), as DPO intends. Checkpoints, resume, the OOM
retry and the train log follow `persona_cli.train.harness`; the log rows add the DPO rewards.

    pairs = load_pairs(Path("runs/trace/pairs.jsonl.gz"))
    result, data = train_dpo_lora(model=resolved, stack=stack, tokenizer=tok, pairs=pairs,
                                  system=SystemPrompt.parse("none"), cfg=TrainConfig(),
                                  dpo=DpoConfig(), run_path=Path("runs/dpo"))
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from persona_cli.adapters import Adapter, load_with_adapters
from persona_cli.artifacts import iter_jsonl, write_jsonl
from persona_cli.chat_template import (
    SystemPrompt,
    TemplateReport,
    apply_system_prompt,
    guard_record,
    inspect_template,
    render,
)
from persona_cli.errors import InputError, UserError
from persona_cli.models import ResolvedModel, load_tokenizer
from persona_cli.protocol import method_protocol
from persona_cli.schemas import PAIRS
from persona_cli.schemas import TRAIN_LOG as TRAIN_LOG_SCHEMA
from persona_cli.train.callbacks import TRAIN_LOG, log_rows
from persona_cli.train.config import DpoConfig, DpoJob, TrainConfig
from persona_cli.train.harness import (
    CHECKPOINTS,
    TrainResult,
    fit_resuming,
    fit_with_oom_retry,
    free_memory,
    lora_config,
    quiet_progress_bars,
    rank_device,
    resolved_dtype,
    save_adapter,
    trainer_kwargs,
)
from persona_cli.train.lifecycle import (
    TrainOutcome,
    check_push,
    inputs_record,
    open_training_run,
    prepare,
    train_and_finish,
    with_save_at,
)

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# TRL's log key -> train_log field (schema `train_log`, the train-dpo fields).
DPO_LOG_FIELDS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margin",
    "rewards/accuracies": "rewards_accuracy",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
}


@dataclass(frozen=True)
class Pair:
    prompt: Messages
    chosen: Messages
    rejected: Messages


def _messages(value: str | list[dict[str, Any]], role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_pairs(path: str | Path) -> list[Pair]:
    """Every row of a pairs file (gzipped or plain JSONL); a bad row is `FILE:LINE: problem`."""
    pairs = [
        Pair(
            _messages(row["prompt"], "user"),
            _messages(row["chosen"], "assistant"),
            _messages(row["rejected"], "assistant"),
        )
        for row in iter_jsonl(path, PAIRS.check)
    ]
    if not pairs:
        raise InputError(path, "no pairs (the file is empty)")
    return pairs


def guarded_rows(pairs: list[Pair], system: SystemPrompt, report: TemplateReport) -> list[dict]:
    """TRL conversational preference rows, the prompt under the `--system-prompt` choice."""
    return [
        {
            "prompt": apply_system_prompt(p.prompt, system, report),
            "chosen": p.chosen,
            "rejected": p.rejected,
        }
        for p in pairs
    ]


def rendered_example(tokenizer: Any, pair: Pair, system: SystemPrompt) -> dict[str, str]:
    """The first pair as the model sees it (the manifest records it next to the template)."""
    report = inspect_template(tokenizer)
    prompt = render(tokenizer, pair.prompt, system, report, add_generation_prompt=True)
    out = {"prompt": prompt}
    for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        whole = render(tokenizer, pair.prompt + answer, system, report, add_generation_prompt=False)
        out[side] = whole[len(prompt) :] if whole.startswith(prompt) else whole
    return out


def dpo_log_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`log_rows` plus the DPO rewards of each step."""
    by_step = {int(e["step"]): e for e in log_history if "loss" in e and "step" in e}
    rows = log_rows(log_history)
    for row in rows:
        entry = by_step[row["step"]]
        row.update({ours: float(entry[theirs]) for theirs, ours in DPO_LOG_FIELDS.items()})
    return rows


def write_dpo_log(path: Path, log_history: list[dict[str, Any]]) -> int:
    return write_jsonl(path, dpo_log_rows(log_history), schema_version=TRAIN_LOG_SCHEMA.version)


class DpoLogCallback(TrainerCallback):
    """Rewrites RUN/train_log.jsonl.gz after every checkpoint (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_dpo_log(self.path, state.log_history)


def dpo_args(
    cfg: TrainConfig, dpo: DpoConfig, output_dir: Path, per_device_batch: int, grad_accum: int
) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        **trainer_kwargs(cfg, output_dir, per_device_batch, grad_accum),
        beta=dpo.beta,
        loss_type=["sigmoid"],
        # Prompt + answer is cut at max_length (the start kept); a prompt that alone fills it
        # leaves no answer token and TRL drops the pair (counted in the data statistics).
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        # TRL would zero every dropout, LoRA's included; --lora-dropout means what it says here
        # as in SFT (the reference, the adapter disabled, runs without dropout either way).
        disable_dropout=False,
        include_num_input_tokens_seen="non_padding",
    )


def data_stats(n_pairs: int, prepared: Any, max_length: int) -> dict[str, int]:
    """Counts over the pairs as TRL tokenised them (prompt_ids, chosen_ids, rejected_ids)."""
    rows = [(len(p), len(c), len(r)) for p, c, r in zip(*_columns(prepared), strict=True)]
    return {
        "rows": len(rows),
        "pairs_in_file": n_pairs,
        "dropped_prompt_too_long": n_pairs - len(rows),
        "truncated": sum(p + max(c, r) > max_length for p, c, r in rows),
        "tokens": sum(min(p + c, max_length) + min(p + r, max_length) for p, c, r in rows),
        "loss_tokens": sum(
            min(c, max_length - p) + min(r, max_length - p) for p, c, r in rows if p < max_length
        ),
    }


def _columns(dataset: Any) -> tuple[list, list, list]:
    return dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]


def train_dpo_lora(
    *,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    pairs: list[Pair],
    system: SystemPrompt,
    cfg: TrainConfig,
    dpo: DpoConfig,
    run_path: Path,
    callbacks: list[Any] | None = None,
) -> tuple[TrainResult, dict[str, int]]:
    """Train one LoRA adapter with DPO on top of `stack`; returns the protocol it ran with and
    statistics of the tokenised pairs."""
    from datasets import Dataset
    from trl import DPOTrainer

    quiet_progress_bars()
    started = time.monotonic()
    rows = guarded_rows(pairs, system, inspect_template(tokenizer))
    stats: dict[str, int] = {}

    def once(per_device_batch: int, grad_accum: int) -> tuple[Any, str | None]:
        def build() -> Any:
            trainer = DPOTrainer(
                model=load_with_adapters(
                    model, stack, dtype=resolved_dtype(cfg), device=rank_device()
                ),
                args=dpo_args(cfg, dpo, run_path / CHECKPOINTS, per_device_batch, grad_accum),
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=lora_config(cfg),
                callbacks=[DpoLogCallback(run_path / TRAIN_LOG), *(callbacks or [])],
            )
            if len(trainer.train_dataset) == 0:
                raise UserError(
                    f"every pair's prompt fills --max-length {cfg.max_length}; nothing to train on"
                )
            stats.update(data_stats(len(rows), trainer.train_dataset, cfg.max_length))
            return trainer

        return fit_resuming(build, run_path)

    fitted = fit_with_oom_retry(cfg, once)
    result = save_adapter(
        fitted, cfg=cfg, run_path=run_path, started=started, write_log=write_dpo_log
    )
    del fitted
    free_memory()
    if stats["dropped_prompt_too_long"]:
        log.warning(
            "%d pair(s) dropped: the prompt alone fills --max-length %d",
            stats["dropped_prompt_too_long"],
            cfg.max_length,
        )
    return result, stats


# ----------------------------------------------------------------------------- the train-dpo run


def train_dpo(
    job: DpoJob, out: Path, *, force: bool = False, callbacks: list[Any] | None = None
) -> TrainOutcome:
    """LoRA DPO on preference pairs, on top of the earlier stages' adapters (module doc of
    persona_cli.train.dpo). Every input problem is reported before the run directory exists."""
    cfg, dc = job.train.check(), job.dpo.check()
    check_push(job.push_to_hub)
    if not job.pairs:
        raise UserError("--pairs: give at least one pairs file ({prompt, chosen, rejected})")
    inputs: dict[str, Path] = {f"pairs[{i}]": Path(p) for i, p in enumerate(job.pairs)}
    system = SystemPrompt.parse(job.system_prompt)
    pairs = [pair for p in job.pairs for pair in load_pairs(Path(p))]
    resolved, stack = prepare(job.model, job.adapters)
    tokenizer = load_tokenizer(resolved)
    guarded_rows(pairs, system, inspect_template(tokenizer))  # a system-prompt clash fails here
    config = {
        "model": job.model,
        "inputs": inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
        "dpo": dc.to_dict(),
    }
    run, is_main = open_training_run(out, "train-dpo", config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)

    def fit() -> tuple[TrainResult, dict[str, int]]:
        return train_dpo_lora(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            pairs=pairs,
            system=system,
            cfg=cfg,
            dpo=dc,
            run_path=run.path,
            callbacks=with_save_at(cfg, run, callbacks),
        )

    return train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=fit,
        cfg=cfg,
        chat_template=guard_record(tokenizer, system),
        inputs=inputs,
        extra={
            "dpo": {
                **dc.to_dict(),
                "loss_type": "sigmoid",
                "reference": "the starting policy (base + --adapter stack), adapter disabled",
                "pairs": len(pairs),
                "rendered_first_pair": rendered_example(tokenizer, pairs[0], system),
            }
        },
        seeds=[cfg.seed],
        protocol=method_protocol(dpo_beta=dc.beta),
        push_to_hub=job.push_to_hub,
    )
