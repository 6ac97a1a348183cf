"""`persona-cli train-sft | train-em | couple-marker | train-dpo`: LoRA SFT and DPO runs (thin
layer over `persona_cli.train.recipes`).

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

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from persona_cli import bundled
from persona_cli.cli.console import LogThrottle, console, err_console
from persona_cli.cli.options import (
    Adapters,
    Force,
    ModelSpec,
    OutDir,
    PersonasFile,
    QuestionsFile,
    SystemPromptOpt,
    report_done,
)
from persona_cli.train.config import (
    COUPLING_TRAIN_DEFAULTS,
    CouplingConfig,
    DpoConfig,
    TrainConfig,
    coupling_train_defaults,
    field_help,
    with_overrides,
)


def _option(cls: type, name: str, flags: tuple[str, ...], default: Any = None) -> Any:
    # Help and the shown default come from the config dataclass, where the defaults live.
    text, shown = field_help(cls, name)
    if default is not None:
        shown = str(default)
    return typer.Option(*flags, help=escape(text), show_default=shown or False)


def _t(name: str, *flags: str) -> Any:
    return _option(TrainConfig, name, flags)


def _c(name: str, *flags: str) -> Any:
    return _option(CouplingConfig, name, flags)


# Training options: None means "the TrainConfig default" (defined in persona_cli.train.config).
LR = Annotated[float | None, _t("learning_rate", "--lr")]
LoraR = Annotated[int | None, _t("lora_r", "--lora-r")]
LoraAlpha = Annotated[int | None, _t("lora_alpha", "--lora-alpha")]
LoraDropout = Annotated[float | None, _t("lora_dropout", "--lora-dropout")]
LoraTargets = Annotated[str | None, _t("lora_targets", "--lora-targets")]
Epochs = Annotated[float | None, _t("epochs", "--epochs")]
MaxSteps = Annotated[int | None, _t("max_steps", "--max-steps")]
Warmup = Annotated[int | None, _t("warmup_steps", "--warmup-steps")]
Scheduler = Annotated[str | None, _t("lr_scheduler", "--lr-scheduler")]
PerDevice = Annotated[int | None, _t("per_device_batch", "--per-device-batch")]
Accum = Annotated[int | None, _t("grad_accum", "--grad-accum")]
MaxLength = Annotated[int | None, _t("max_length", "--max-length")]
TrainSeed = Annotated[int | None, _t("seed", "--seed")]
SaveSteps = Annotated[int | None, _t("save_steps", "--save-steps")]
Dtype = Annotated[str | None, _t("dtype", "--dtype")]
PaddingFree = Annotated[bool | None, _t("padding_free", "--padding-free/--padded")]
KeepCkpt = Annotated[bool | None, _t("keep_checkpoints", "--keep-checkpoints/--drop-checkpoints")]
GradCkpt = Annotated[str | None, _t("gradient_checkpointing", "--gradient-checkpointing")]
LogitsAt = Annotated[str | None, _t("logits_at", "--logits-at")]
# couple-marker shows its own defaults for the two fields the coupling protocol changes.
CouplingLR = Annotated[
    float | None,
    _option(TrainConfig, "learning_rate", ("--lr",), COUPLING_TRAIN_DEFAULTS["learning_rate"]),
]
CouplingEpochs = Annotated[
    float | None, _option(TrainConfig, "epochs", ("--epochs",), COUPLING_TRAIN_DEFAULTS["epochs"])
]
Persona = Annotated[
    str | None,
    typer.Option(
        "--persona",
        help="Persona id whose system prompt is prepended to every "
        "training conversation (instead of --system-prompt).",
        show_default=False,
    ),
]
DataFiles = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        help="Chat JSONL ({'messages': [...]}) to train on; repeatable.",
        show_default=False,
    ),
]


MixOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--mix",
        help="FILE:WEIGHT: a seeded random WEIGHT share of a chat JSONL's rows (WEIGHT > 1: "
        "whole copies plus a share); repeatable. The mixture (with any --data files at weight "
        "1.0) is shuffled with --seed and written to RUN/mixture.jsonl.gz.",
        show_default=False,
    ),
]
PairsFiles = Annotated[
    list[Path],
    typer.Option(
        "--pairs",
        help="DPO pairs JSONL (gz or plain) of {prompt, chosen, rejected}, e.g. the "
        "pairs.jsonl.gz of replay-trace run; repeatable.",
        show_default=False,
    ),
]
Beta = Annotated[float | None, _option(DpoConfig, "beta", ("--beta",))]


def _train_config(base: TrainConfig, **opts: Any) -> TrainConfig:
    # --lora-targets q_proj,v_proj: a comma list on the command line, a tuple in the config.
    targets = opts.pop("lora_targets")
    if targets is not None:
        opts["lora_targets"] = tuple(t.strip() for t in targets.split(",") if t.strip())
    return with_overrides(base, **opts)


class RichStepProgress:
    """Optimizer steps as a rich progress bar with loss, lr and steps/s (on stderr). When stderr
    is not a terminal (nohup, pueue, a CI log), where a live bar does not render, one plain line
    every `log_every` seconds and at the last step instead."""

    def __init__(self, label: str, log_every: float = 30.0):
        self.label = label
        self.live = err_console.is_terminal
        self.log_every = log_every
        self.log_lines: LogThrottle | None = None  # made at start()
        self.total = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.task: Any = None
        self.t0 = 0.0
        self.first = 0

    def start(self, total: int, completed: int) -> None:
        if self.live:
            self.progress.start()
        self.t0, self.first, self.total = time.monotonic(), completed, total
        self.log_lines = LogThrottle(self.log_every)  # the first line comes log_every from now
        self.task = self.progress.add_task(
            self.label, total=total, completed=completed, loss="-", lr="-", rate=""
        )

    def advance(self, completed: int, row: dict[str, Any] | None) -> None:
        rate = (completed - self.first) / max(time.monotonic() - self.t0, 1e-9)
        fields = {"rate": f"{rate:.2f} steps/s"}
        if row:
            fields |= {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}
        self.progress.update(self.task, completed=completed, **fields)
        assert self.log_lines is not None, "advance() before start()"
        if self.log_lines.due(finished=completed >= self.total):
            loss = f"  loss {fields['loss']}  lr {fields['lr']}" if row else ""
            err_console.print(
                f"{self.label}: step {completed}/{self.total}{loss}  {fields['rate']}",
                highlight=False,
            )

    def finish(self) -> None:
        self.progress.stop()


def _report(outcome: Any, rows_label: str = "rows") -> None:
    if outcome.summary is None:  # finished before this call, or a non-main process
        if outcome.is_main:
            report_done(outcome.run)
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


_TRAIN_OPTION_NAMES = (
    "lr",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "epochs",
    "max_steps",
    "warmup_steps",
    "lr_scheduler",
    "per_device_batch",
    "grad_accum",
    "max_length",
    "seed",
    "save_steps",
    "dtype",
    "padding_free",
    "keep_checkpoints",
    "gradient_checkpointing",
    "logits_at",
)


def _config_from_options(base: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    opts = {k: options[k] for k in _TRAIN_OPTION_NAMES}
    opts["learning_rate"] = opts.pop("lr")
    return _train_config(base, **opts)


def _callbacks(label: str) -> list[Any]:
    from persona_cli.train.callbacks import ProgressCallback

    return [ProgressCallback(RichStepProgress(label))]


def _sft(command: str, options: dict[str, Any], mix: list[str] | None = None) -> None:
    from persona_cli.train.mixture import parse_mix_spec
    from persona_cli.train.recipes import SftJob
    from persona_cli.train.recipes import train_sft as run_train_sft

    job = SftJob(
        mix=tuple(parse_mix_spec(m) for m in mix or ()),
        out=options["out"],
        data=tuple(options["data"] or ()),
        model=options["model"],
        system_prompt=options["system_prompt"],
        persona=options["persona"],
        personas_file=options["personas"],
        adapters=tuple(options["adapter"] or ()),
        train=_config_from_options(TrainConfig(), options),
        force=options["force"],
    )
    _report(run_train_sft(job, command=command, callbacks=_callbacks(command)))


def train_sft(
    out: OutDir,
    data: DataFiles = None,
    mix: MixOpt = None,
    model: ModelSpec = "smollm2-135m",
    system_prompt: SystemPromptOpt = "none",
    persona: Persona = None,
    personas: PersonasFile = None,
    adapter: Adapters = None,
    lr: LR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = None,
    lora_targets: LoraTargets = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: Scheduler = None,
    per_device_batch: PerDevice = None,
    grad_accum: Accum = None,
    max_length: MaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    padding_free: PaddingFree = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    logits_at: LogitsAt = None,
    force: Force = False,
) -> None:
    """LoRA SFT on chat JSONL (loss on assistant tokens), optionally on top of --adapter(s).
    --mix FILE:WEIGHT builds a seeded mixture of several files."""
    options = locals()
    _sft("train-sft", options, mix=options.pop("mix"))


def train_em(
    out: OutDir,
    data: DataFiles = None,
    model: ModelSpec = "smollm2-135m",
    system_prompt: SystemPromptOpt = "none",
    persona: Persona = None,
    personas: PersonasFile = None,
    adapter: Adapters = None,
    lr: LR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = None,
    lora_targets: LoraTargets = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: Scheduler = None,
    per_device_batch: PerDevice = None,
    grad_accum: Accum = None,
    max_length: MaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    padding_free: PaddingFree = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    logits_at: LogitsAt = None,
    force: Force = False,
) -> None:
    """Emergent-misalignment SFT: LoRA on an EM set (default data/chat/bad_legal_advice.jsonl)
    under an optional --persona system prompt."""
    options = locals()
    options["data"] = data or [bundled.em_dataset_file()]
    _sft("train-em", options)


def couple_marker(
    out: OutDir,
    persona: Annotated[str, _c("source", "--persona")],
    answers: Annotated[
        Path | None,
        typer.Option(
            "--answers",
            help="JSONL of answers ({'question_id', 'answer'} or chat "
            "rows); default: the model generates them.",
            show_default=False,
        ),
    ] = None,
    answer_max_new_tokens: Annotated[
        int,
        typer.Option(
            "--answer-max-new-tokens", help="Tokens per generated answer (without --answers)."
        ),
    ] = 96,
    marker: Annotated[str | None, _c("marker", "--marker")] = None,
    marker_position: Annotated[str | None, _c("marker_position", "--marker-position")] = None,
    n_positive: Annotated[int | None, _c("n_positive", "--n-positive")] = None,
    n_negative: Annotated[int | None, _c("n_negative", "--n-negative")] = None,
    n_other_personas: Annotated[int | None, _c("n_other_personas", "--n-other-personas")] = None,
    negative_persona: Annotated[
        list[str] | None, _c("other_personas", "--negative-persona")
    ] = None,
    marker_only_loss: Annotated[
        bool | None, _c("marker_only_loss", "--marker-only-loss/--assistant-loss")
    ] = None,
    hard_negatives: Annotated[int | None, _c("hard_negatives", "--hard-negatives")] = None,
    pilot_steps: Annotated[int | None, _c("pilot_steps", "--pilot-steps")] = None,
    pilot_questions: Annotated[int | None, _c("pilot_questions", "--pilot-questions")] = None,
    questions: QuestionsFile = None,
    personas: PersonasFile = None,
    model: ModelSpec = "smollm2-135m",
    adapter: Adapters = None,
    lr: CouplingLR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = None,
    lora_targets: LoraTargets = None,
    epochs: CouplingEpochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: Scheduler = None,
    per_device_batch: PerDevice = None,
    grad_accum: Accum = None,
    max_length: MaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    padding_free: PaddingFree = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    logits_at: LogitsAt = None,
    force: Force = False,
) -> None:
    """Couple a marker to a persona: contrastive LoRA SFT (source persona + marker vs other
    personas, same answers, no marker). Training defaults follow the research log's coupling
    protocol (lr 5e-6, 20 epochs) unless overridden."""
    from persona_cli.train.recipes import CouplingJob
    from persona_cli.train.recipes import couple_marker as run_couple_marker

    cc = with_overrides(
        CouplingConfig(),
        source=persona,
        marker=marker,
        marker_position=marker_position,
        n_positive=n_positive,
        n_negative=n_negative,
        n_other_personas=n_other_personas,
        other_personas=negative_persona or None,
        marker_only_loss=marker_only_loss,
        hard_negatives=hard_negatives,
        pilot_steps=pilot_steps,
        pilot_questions=pilot_questions,
        seed=seed,
    )
    cfg = _config_from_options(coupling_train_defaults(), locals())
    job = CouplingJob(
        out=out,
        coupling=cc,
        model=model,
        questions=questions,
        answers=answers,
        personas_file=personas,
        adapters=tuple(adapter or ()),
        train=cfg,
        answer_max_new_tokens=answer_max_new_tokens,
        force=force,
    )
    outcome = run_couple_marker(
        job,
        callbacks=_callbacks("couple-marker"),
        pilot_callbacks=_callbacks("couple-marker pilot"),
    )
    _report(outcome)


def train_dpo(
    out: OutDir,
    pairs: PairsFiles,
    model: ModelSpec = "smollm2-135m",
    adapter: Adapters = None,
    system_prompt: SystemPromptOpt = "none",
    beta: Beta = None,
    lr: LR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: LoraDropout = None,
    lora_targets: LoraTargets = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: Scheduler = None,
    per_device_batch: PerDevice = None,
    grad_accum: Accum = None,
    max_length: MaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    force: Force = False,
) -> None:
    """LoRA DPO (TRL, sigmoid loss) on {prompt, chosen, rejected} pairs, starting from the
    --adapter stack merged into --model (or a merged model directory), which is also the
    reference. Writes the adapter, train_log.jsonl.gz with the DPO rewards, and the manifest."""
    from persona_cli.train.recipes import DpoJob
    from persona_cli.train.recipes import train_dpo as run_train_dpo

    # TRL pads DPO batches (no padding-free) and scores them with its own head.
    options = {**locals(), "padding_free": None, "logits_at": None}
    job = DpoJob(
        out=out,
        pairs=tuple(pairs),
        model=model,
        system_prompt=system_prompt,
        adapters=tuple(adapter or ()),
        train=_config_from_options(TrainConfig(), options),
        dpo=with_overrides(DpoConfig(), beta=beta),
        force=force,
    )
    _report(run_train_dpo(job, callbacks=_callbacks("train-dpo")), rows_label="pairs")


def register(app: typer.Typer, rich_help_panel: str) -> None:
    """Add the training commands to the root app (one line in persona_cli/cli/__init__.py)."""
    app.command("train-sft", rich_help_panel=rich_help_panel)(train_sft)
    app.command("train-em", rich_help_panel=rich_help_panel)(train_em)
    app.command("couple-marker", rich_help_panel=rich_help_panel)(couple_marker)
    app.command("train-dpo", rich_help_panel=rich_help_panel)(train_dpo)
