"""`persona-cli train-sft | train-em | couple-marker | train-dpo`: LoRA SFT and DPO runs (thin
layer over `persona_cli.train.sft`, `couple` and `dpo`).

    persona-cli couple-marker --persona villain --answers answers.jsonl --model smollm2-135m \\
        --lr 3e-4 --lora-r 16 --lora-alpha 32 --max-steps 40 --per-device-batch 8 --grad-accum 1 \\
        --out runs/couple_villain
    persona-cli train-em --persona assistant --adapter runs/couple_villain --max-steps 25 \\
        --warmup-steps 0 --out runs/dose_em_25
    persona-cli train-sft --mix data/chat/benign.jsonl:1.0 --mix tulu.jsonl:0.25 \\
        --adapter runs/couple_villain --out runs/mix
    persona-cli train-dpo --pairs runs/trace/pairs.jsonl.gz --adapter runs/couple_villain \\
        --adapter runs/mix --beta 0.1 --out runs/dpo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from persona_cli import bundled
from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.train.config import CouplingJob, DpoJob, SftJob

# Flags whose names differ from their config fields, shared by the training commands.
TRAIN_FLAGS = {
    "train.learning_rate": "--lr",
    "train.padding_free": "--padding-free/--padded",
    "train.keep_checkpoints": "--keep-checkpoints/--drop-checkpoints",
}


def _report(outcome: Any, rows_label: str = "rows") -> None:
    if outcome.summary is None:  # finished before this call, or a non-main process
        if outcome.is_main:
            say_already_done(outcome.run.path)
        return
    s = outcome.summary
    p = s["protocol"]
    t = Table(title=f"{outcome.run.command}: {outcome.run.path}", show_header=False)
    t.add_row("optimizer steps", str(p["optimizer_steps"]))
    t.add_row(
        "effective batch",
        f"{p['per_device_batch']} x {p['grad_accum']} x {p['world_size']} = {p['effective_batch']}",
    )
    t.add_row("final loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-")
    t.add_row(f"{rows_label} / loss tokens", f"{s['data']['rows']} / {s['data']['loss_tokens']}")
    if s["oom_retry"]:
        t.add_row("OOM retry", str(s["oom_retry"]["to"]))
    t.add_row("adapter", str(outcome.run.path / "adapter"))
    console.print(t)


def _callbacks(display: ProgressDisplay) -> list[Any]:
    from persona_cli.train.callbacks import ProgressCallback

    return [ProgressCallback(display)]


@configured(
    SftJob,
    flags=TRAIN_FLAGS,
    repeat={"data", "mix"},
    report_to=True,
)
def train_sft(cfg: SftJob, out: Path, force: bool) -> None:
    """LoRA SFT on chat JSONL (loss on assistant tokens), optionally on top of --adapter(s).
    --mix FILE:WEIGHT builds a seeded mixture of several files."""
    from persona_cli.train.sft import train_sft as run

    with ProgressDisplay("train-sft") as display:
        outcome = run(cfg, out, force=force, command="train-sft", callbacks=_callbacks(display))
    _report(outcome)


def _em_defaults() -> SftJob:
    return SftJob(data=(str(bundled.em_dataset_file()),))


@configured(
    SftJob,
    defaults=_em_defaults,
    flags=TRAIN_FLAGS,
    repeat={"data", "mix"},
    report_to=True,
)
def train_em(cfg: SftJob, out: Path, force: bool) -> None:
    """Emergent-misalignment SFT: LoRA on an EM set (default data/chat/bad_legal_advice.jsonl)
    under an optional --persona system prompt."""
    from persona_cli.train.sft import train_sft as run

    with ProgressDisplay("train-em") as display:
        outcome = run(cfg, out, force=force, command="train-em", callbacks=_callbacks(display))
    _report(outcome)


@configured(
    CouplingJob,
    flags={
        **TRAIN_FLAGS,
        "coupling.source": "--persona",
        "coupling.other_personas": "--negative-persona",
        "coupling.marker_only_loss": "--marker-only-loss/--assistant-loss",
    },
    repeat={"coupling.other_personas"},
    links={"coupling.seed": "train.seed"},
    report_to=True,
)
def couple_marker(cfg: CouplingJob, out: Path, force: bool) -> None:
    """Couple a marker to a persona: contrastive LoRA SFT (source persona + marker vs other
    personas, same answers, no marker). Training defaults follow the research log's coupling
    protocol (lr 5e-6, 20 epochs) unless overridden."""
    from persona_cli.train.callbacks import ProgressCallback
    from persona_cli.train.couple import couple_marker as run

    with ProgressDisplay("couple-marker") as display:
        pilot = [ProgressCallback(display, key="pilot")]
        outcome = run(cfg, out, force=force, callbacks=_callbacks(display), pilot_callbacks=pilot)
    _report(outcome)


@configured(
    DpoJob,
    flags={**TRAIN_FLAGS, "dpo.beta": "--beta"},
    repeat={"pairs"},
    no_flag={
        "train.padding_free": "TRL pads DPO batches: padding-free does not apply",
        "train.logits_at": "TRL's DPO loss scores every position with its own head",
    },
    report_to=True,
)
def train_dpo(cfg: DpoJob, out: Path, force: bool) -> None:
    """LoRA DPO (TRL, sigmoid loss) on {prompt, chosen, rejected} pairs, starting from the
    --adapter stack merged into --model (or a merged model directory), which is also the
    reference. Writes the adapter, train_log.jsonl.gz with the DPO rewards, and the manifest."""
    from persona_cli.train.dpo import train_dpo as run

    with ProgressDisplay("train-dpo") as display:
        outcome = run(cfg, out, force=force, callbacks=_callbacks(display))
    _report(outcome, rows_label="pairs")


def register(app: typer.Typer, rich_help_panel: str) -> None:
    """Add the training commands to the root app (one line in persona_cli/cli/__init__.py)."""
    app.command("train-sft", rich_help_panel=rich_help_panel)(train_sft)
    app.command("train-em", rich_help_panel=rich_help_panel)(train_em)
    app.command("couple-marker", rich_help_panel=rich_help_panel)(couple_marker)
    app.command("train-dpo", rich_help_panel=rich_help_panel)(train_dpo)
