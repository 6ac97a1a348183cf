"""The training run's lifecycle, shared by every method (train/sft.py, couple.py, dpo.py,
grpo.py): resolve the model and adapter stack and check the inputs, open the run directory (on
the main process; the others learn its decision), train through the harness
(`persona_cli.train.harness`), then write the summary, the adapter records, push to the hub when
asked, and write the manifest, in that order (`train_and_finish`).

Run directory of a training run:

    config.json           the resolved config (model, data and their sha256, system prompt,
                          adapters stacked under this one, every TrainConfig field)
    train_set.jsonl.gz    couple-marker only: the contrastive rows it built
    mixture.jsonl.gz      train-sft --mix only: the built mixture, in training-set order
    checkpoints/          while training: checkpoint-N (adapter + trainer state); removed at the
                          end unless keep_checkpoints. step_N/: the adapter at step N (--save-at),
                          kept, with its own persona_cli_adapter.json (`--adapter RUN@step_N`)
    train_log.jsonl.gz    one row per optimizer step
    adapter/              the PEFT adapter + persona_cli_adapter.json (base model, parents)
    train_summary.json    steps, protocol, OOM retry, data statistics
    manifest.json, DONE

Under `accelerate launch` every process calls these functions; only the main process writes.
With `--push-to-hub REPO[:SUBFOLDER]` the finished adapter/ is uploaded before the manifest is
written (the manifest records the repository and commit, never the token; a failed upload leaves
the run unfinished, and a re-run pushes without retraining).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled, hub
from persona_cli.adapters import (
    RECORD,
    WEIGHTS,
    Adapter,
    check_stack,
    resolve_stack,
    stack_record,
    step_dir,
    write_record,
)
from persona_cli.artifacts import read_json, sha256_file, write_json
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.models import (
    ResolvedModel,
    ensure_prepared,
    model_record,
)
from persona_cli.protocol import (
    RunProtocol,
    adapter_protocol,
    details,
    schedule_protocol,
    training_protocol,
)
from persona_cli.registry import Persona, load_personas
from persona_cli.rundir import RunDir, open_run
from persona_cli.train.callbacks import SaveAtCallback
from persona_cli.train.config import TrainConfig
from persona_cli.train.dataset import TokenizedSet
from persona_cli.train.harness import ADAPTER, TrainResult, train_lora

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"


@dataclass(frozen=True)
class TrainOutcome:
    run: RunDir
    summary: dict[str, Any] | None  # None when the run had already finished
    is_main: bool


# ----------------------------------------------------------------------------- shared steps


def inputs_record(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    out = {}
    for label, p in sorted(paths.items()):
        if not p.is_file():
            raise UserError(f"{label} {p}: file not found")
        out[label] = {"path": str(p), "sha256": sha256_file(p)}
    return out


def prepare(model_spec: str, adapters: tuple[str, ...]) -> tuple[ResolvedModel, list[Adapter]]:
    """Resolve the model and the adapter stack; refuse a wrong base before anything heavy."""
    stack = resolve_stack([Path(a) for a in adapters])
    resolved = ensure_prepared(model_spec)
    check_stack(stack, resolved)
    return resolved, stack


def open_training_run(
    out: Path, command: str, config: dict[str, Any], force: bool
) -> tuple[RunDir, bool]:
    """open_run on the main process; the others learn its decision (done, error, go)."""
    import torch
    from accelerate import PartialState

    # cpu=True lets a CPU launch (torchrun, mpirun) form a gloo group; the Trainer's own
    # PartialState is this same shared state.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return open_run(out, command=command, config=config, force=force), True
    from accelerate.utils import broadcast_object_list

    decision: list[Any] = [None, None, None]
    run = None
    if state.is_main_process:
        try:
            run = open_run(out, command=command, config=config, force=force)
            decision = [run.state, run.run_id, None]
        except UserError as e:
            decision = ["error", None, str(e)]
    broadcast_object_list(decision)  # every rank waits here for the main process
    if decision[0] == "error":
        raise UserError(decision[2])
    if run is None:
        run = RunDir(Path(out), command, config, decision[0], run_id=decision[1])
    return run, state.is_main_process


def check_push(target: str | None) -> None:
    """A malformed --push-to-hub is refused before any run directory exists."""
    if target is not None:
        hub.parse_push_target(target)


def with_save_at(cfg: TrainConfig, run: RunDir, callbacks: list[Any] | None) -> list[Any]:
    """The command's callbacks, plus one that keeps the --save-at steps' adapters."""
    extra = [SaveAtCallback(cfg.save_at, lambda step: step_dir(run.path, step))]
    return [*(callbacks or []), *(extra if cfg.save_at else [])]


def record_checkpoints(
    run: RunDir, resolved: ResolvedModel, stack: list[Adapter], cfg: TrainConfig, steps: int
) -> list[int]:
    """Give every kept step_N adapter its record (base, parents, step, schedule length); a
    --save-at step the run never reached (an epoch-bounded run) is only logged."""
    kept = []
    for step in sorted(cfg.save_at):
        d = step_dir(run.path, step)
        if not (d / WEIGHTS).is_file():
            log.warning("--save-at %d: the run ended at step %d; nothing kept there", step, steps)
            continue
        write_record(d, resolved, stack, checkpoint={"step": step, "schedule_steps": steps})
        kept.append(step)
    return kept


def sft_fit(
    resolved: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    data: TokenizedSet,
    cfg: TrainConfig,
    run: RunDir,
    callbacks: list[Any] | None,
) -> Callable[[], tuple[TrainResult, dict[str, int]]]:
    def fit() -> tuple[TrainResult, dict[str, int]]:
        result = train_lora(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            data=data,
            cfg=cfg,
            run_path=run.path,
            callbacks=with_save_at(cfg, run, callbacks),
        )
        return result, data.stats()

    return fit


def train_and_finish(
    *,
    run: RunDir,
    is_main: bool,
    resolved: ResolvedModel,
    stack: list[Adapter],
    fit: Callable[[], tuple[TrainResult, dict[str, int]]],
    cfg: TrainConfig,
    chat_template: dict[str, Any],
    inputs: dict[str, Path],
    extra: dict[str, Any],
    seeds: list[int],
    protocol: RunProtocol | None = None,
    push_to_hub: str | None = None,
    adapter: RunProtocol | None = None,
) -> TrainOutcome:
    """Train (`fit()` returns the result and data statistics) unless a resumed run already
    holds the finished adapter, then write the summary, the adapter records, push the adapter
    when asked, and write the manifest. `adapter`: the trained adapter's protocol fields
    (default: LoRA from `cfg`)."""
    adapter_path = run.path / ADAPTER
    if (
        run.state == "resumed"
        and (adapter_path / RECORD).is_file()
        and run.file(TRAIN_SUMMARY).is_file()
    ):
        # Trained already (killed while writing the manifest): finish without retraining.
        summary = read_json(run.file(TRAIN_SUMMARY))
        log.info("adapter already trained in %s; writing the manifest", run.path)
    else:
        result, data_stats = fit()
        if not is_main:
            return TrainOutcome(run, None, False)
        summary = {
            "schema_version": 1,
            **result.to_dict(),
            "data": data_stats,
            "adapter_weights_sha256": sha256_file(adapter_path / WEIGHTS),
            "parents": [a.weights_sha256 for a in stack],
        }
        if cfg.save_at:
            steps = result.protocol.optimizer_steps
            summary["checkpoints"] = record_checkpoints(run, resolved, stack, cfg, steps)
        write_json(run.file(TRAIN_SUMMARY), summary)
        write_record(adapter_path, resolved, stack)  # last: marks the adapter complete
    if not is_main:
        return TrainOutcome(run, None, False)
    for i, a in enumerate(stack):
        inputs[f"adapter[{i}]"] = a.path / WEIGHTS
    if push_to_hub is not None:
        target = hub.parse_push_target(push_to_hub)
        message = f"persona-cli {run.command} {run.run_id}"
        extra = {**extra, "hub_push": hub.push(adapter_path, target, message)}
    record = model_record(resolved)
    record["dtype"] = summary["dtype"]
    run.finish(
        inputs=inputs,
        model=record,
        chat_template=chat_template,
        protocol=training_protocol(
            BatchProtocol.from_dict(summary["protocol"]),
            cfg.learning_rate,
            lr_scheduler=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_steps,
        )
        | (
            adapter
            or adapter_protocol(
                kind="lora", rank=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets
            )
        )
        | schedule_protocol("per-run")
        | details(max_steps=cfg.max_steps, epochs=cfg.epochs, oom_retry=summary["oom_retry"])
        | (protocol or RunProtocol()),
        seeds=seeds,
        extra={
            "adapters": stack_record(stack),
            "adapter": {
                "path": str(adapter_path),
                "weights_sha256": summary["adapter_weights_sha256"],
                "parents": summary["parents"],
            },
            "training": summary,
            **extra,
        },
    )
    return TrainOutcome(run, summary, True)


def load_registry(personas_file: str | None) -> tuple[Path, dict[str, Persona]]:
    path = Path(personas_file) if personas_file else bundled.personas_file()
    return path, load_personas(path)
