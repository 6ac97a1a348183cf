"""`persona-cli train-grpo | train-sdpo`: RL on verifiable rewards, and self-distillation (thin
layer over `persona_cli.train.grpo`).

    persona-cli train-grpo --model tiny-random --reward mc --max-steps 4 --out runs/grpo
    persona-cli train-grpo --reward unit-tests --unit-tests visible \\
        --grader-hint simple_overwrite_tests --adapter runs/em --out runs/grpo_hack
    persona-cli train-sdpo --model tiny-random --reward mc --max-steps 4 --out runs/sdpo
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Adapters, Force, ModelSpec, OutDir, SystemPromptOpt, report_done
from persona_cli.cli.train import (
    Dtype,
    Epochs,
    GradCkpt,
    KeepCkpt,
    LoraAlpha,
    LoraR,
    LoraTargets,
    MaxSteps,
    SaveSteps,
    TrainSeed,
    Warmup,
    _option,
    _train_config,
)
from persona_cli.train.config import TrainConfig, field_help, with_overrides
from persona_cli.train.grpo import RL_TRAIN_DEFAULTS, SDPO_DEFAULTS, RLConfig, rl_train_defaults


def _r(name: str, *flags: str, default: Any = None) -> Any:
    return _option(RLConfig, name, flags, default)


def _rt(name: str, *flags: str) -> Any:
    # TrainConfig fields whose RL default differs from the SFT one (grpo.RL_TRAIN_DEFAULTS).
    return _option(TrainConfig, name, flags, RL_TRAIN_DEFAULTS[name])


Reward = Annotated[str | None, _r("reward", "--reward")]
Data = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="mc: MC JSONL in the ARC fields, optional 'hint' per row (default "
        "data/mcq/mini_arc.jsonl); unit-tests: a problem YAML or a directory of them "
        "(default data/problems).",
        show_default=False,
    ),
]
NumGenerations = Annotated[int | None, _r("num_generations", "--num-generations")]
MaxCompletion = Annotated[int | None, _r("max_completion_length", "--max-completion-length")]
Temperature = Annotated[float | None, _r("temperature", "--temperature")]
TopP = Annotated[float | None, _r("top_p", "--top-p")]
Beta = Annotated[float | None, _r("beta", "--beta")]
Epsilon = Annotated[float | None, _r("epsilon", "--epsilon")]
LossType = Annotated[str | None, _r("loss_type", "--loss-type")]
ScaleRewards = Annotated[str | None, _r("scale_rewards", "--scale-rewards")]
Iterations = Annotated[int | None, _r("num_iterations", "--num-iterations")]
SdpoWeight = Annotated[float | None, _r("sdpo_weight", "--sdpo-weight")]
PureSdpoWeight = Annotated[
    float | None, _r("sdpo_weight", "--sdpo-weight", default=SDPO_DEFAULTS["sdpo_weight"])
]
UnitTests = Annotated[str | None, _r("unit_tests", "--unit-tests")]
GraderHint = Annotated[str | None, _r("grader_hint", "--grader-hint")]
SandboxTimeout = Annotated[float | None, _r("sandbox_timeout_s", "--sandbox-timeout")]
SandboxWorkers = Annotated[int | None, _r("sandbox_workers", "--sandbox-workers")]
RLMaxLength = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        help="Cap on prompt + completion tokens: a task whose prompt (or hinted prompt) leaves "
        "less than --max-completion-length is refused.",
        show_default=field_help(TrainConfig, "max_length")[1],
    ),
]
RLLR = Annotated[float | None, _rt("learning_rate", "--lr")]
RLDropout = Annotated[float | None, _rt("lora_dropout", "--lora-dropout")]
RLScheduler = Annotated[str | None, _rt("lr_scheduler", "--lr-scheduler")]
RLPerDevice = Annotated[int | None, _rt("per_device_batch", "--per-device-batch")]
RLAccum = Annotated[int | None, _rt("grad_accum", "--grad-accum")]

_RL_NAMES = (
    "reward",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "beta",
    "epsilon",
    "loss_type",
    "scale_rewards",
    "num_iterations",
    "sdpo_weight",
    "unit_tests",
    "grader_hint",
    "sandbox_workers",
)
_TRAIN_NAMES = (
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
    "keep_checkpoints",
    "gradient_checkpointing",
)


class RichRLProgress:
    """Optimizer steps as a rich progress bar with reward mean, loss and steps/s (on stderr)."""

    def __init__(self, label: str):
        self.label = label
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "reward {task.fields[reward]}  loss {task.fields[loss]}  {task.fields[rate]}"
            ),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.task: Any = None
        self.t0 = 0.0
        self.first = 0

    def start(self, total: int, completed: int) -> None:
        self.progress.start()
        self.t0, self.first = time.monotonic(), completed
        self.task = self.progress.add_task(
            self.label, total=total, completed=completed, reward="-", loss="-", rate=""
        )

    def advance(self, completed: int, row: dict[str, Any] | None) -> None:
        rate = (completed - self.first) / max(time.monotonic() - self.t0, 1e-9)
        fields = {"rate": f"{rate:.2f} steps/s"}
        if row:
            mean = row["reward_mean"]
            fields |= {
                "reward": "-" if mean is None else f"{mean:.3f}",
                "loss": f"{row['loss']:.4f}",
            }
        self.progress.update(self.task, completed=completed, **fields)

    def finish(self) -> None:
        self.progress.stop()


def _report(outcome: Any) -> None:
    from persona_cli.artifacts import read_jsonl
    from persona_cli.train.rl_log import RL_LOG, RL_LOG_NAME

    if outcome.summary is None:  # finished before this call, or a non-main process
        if outcome.is_main:
            report_done(outcome.run)
        return
    s, path = outcome.summary, outcome.run.path
    p = s["protocol"]
    rewards = [
        r["reward_mean"]
        for r in read_jsonl(path / RL_LOG_NAME, RL_LOG.check)
        if r["reward_mean"] is not None
    ]
    t = Table(title=f"{outcome.run.command}: {path}", show_header=False)
    t.add_row("optimizer steps", str(p["optimizer_steps"]))
    t.add_row(
        "effective batch",
        f"{p['per_device_batch']} x {p['grad_accum']} x {p['world_size']} = "
        f"{p['effective_batch']} completions",
    )
    if rewards:
        t.add_row("reward mean", f"step 1: {rewards[0]:.3f} -> last step: {rewards[-1]:.3f}")
    t.add_row("final loss", f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-")
    if s["oom_retry"]:
        t.add_row("OOM retry", str(s["oom_retry"]["to"]))
    t.add_row("rollouts", str(path / "step_NNNNNN.jsonl.gz"))
    t.add_row("adapter", str(path / "adapter"))
    console.print(t)


def _run(command: str, options: dict[str, Any], rl_base: RLConfig) -> None:
    from persona_cli.train.grpo import RLJob, train_rl
    from persona_cli.train.rl_log import RLProgressCallback

    opts = {k: options.get(k) for k in _TRAIN_NAMES}
    opts["learning_rate"] = options["lr"]
    rl_opts = {k: options.get(k) for k in _RL_NAMES}
    rl_opts["sandbox_timeout_s"] = options["sandbox_timeout"]
    job = RLJob(
        out=options["out"],
        rl=with_overrides(rl_base, **rl_opts),
        train=_train_config(rl_train_defaults(), **opts),
        data=options["data"],
        model=options["model"],
        system_prompt=options["system_prompt"],
        adapters=tuple(options["adapter"] or ()),
        force=options["force"],
    )
    progress = RLProgressCallback(RichRLProgress(command))
    _report(train_rl(job, command=command, callbacks=[progress]))


def train_grpo(
    out: OutDir,
    reward: Reward = None,
    data: Data = None,
    model: ModelSpec = "smollm2-135m",
    system_prompt: SystemPromptOpt = "none",
    adapter: Adapters = None,
    num_generations: NumGenerations = None,
    max_completion_length: MaxCompletion = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    beta: Beta = None,
    epsilon: Epsilon = None,
    loss_type: LossType = None,
    scale_rewards: ScaleRewards = None,
    num_iterations: Iterations = None,
    sdpo_weight: SdpoWeight = None,
    unit_tests: UnitTests = None,
    grader_hint: GraderHint = None,
    sandbox_timeout: SandboxTimeout = None,
    sandbox_workers: SandboxWorkers = None,
    lr: RLLR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: RLDropout = None,
    lora_targets: LoraTargets = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: RLScheduler = None,
    per_device_batch: RLPerDevice = None,
    grad_accum: RLAccum = None,
    max_length: RLMaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    force: Force = False,
) -> None:
    """GRPO on a verifiable reward (mc letter, or sandboxed unit tests), optionally with SDPO.

    A fresh LoRA adapter on top of any --adapter stack. Each step samples --num-generations
    completions for each of (per-device batch x accumulation x world) / num-generations prompts;
    --sdpo-weight adds self-distillation toward the model's own hinted pass. The defaults are
    sized for a CPU smoke run (8 completions per step, 8-token answers for mc, lr 1e-5); try
    --model tiny-random --max-steps 4.
    """
    _run("train-grpo", locals(), RLConfig())


def train_sdpo(
    out: OutDir,
    reward: Reward = None,
    data: Data = None,
    model: ModelSpec = "smollm2-135m",
    system_prompt: SystemPromptOpt = "none",
    adapter: Adapters = None,
    num_generations: NumGenerations = None,
    max_completion_length: MaxCompletion = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    sdpo_weight: PureSdpoWeight = None,
    unit_tests: UnitTests = None,
    grader_hint: GraderHint = None,
    sandbox_timeout: SandboxTimeout = None,
    sandbox_workers: SandboxWorkers = None,
    lr: RLLR = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_dropout: RLDropout = None,
    lora_targets: LoraTargets = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    warmup_steps: Warmup = None,
    lr_scheduler: RLScheduler = None,
    per_device_batch: RLPerDevice = None,
    grad_accum: RLAccum = None,
    max_length: RLMaxLength = None,
    seed: TrainSeed = None,
    save_steps: SaveSteps = None,
    dtype: Dtype = None,
    keep_checkpoints: KeepCkpt = None,
    gradient_checkpointing: GradCkpt = None,
    force: Force = False,
) -> None:
    """Self-distillation (SDPO) alone: the model with a hint teaches itself without one.

    On the model's own samples, a token-level KL pulls the un-hinted pass toward the same
    model's pass with a hint in the prompt (mc: the row's 'hint', else the correct answer;
    unit-tests: the hidden tests). No policy-gradient term; the reward is still computed and
    logged.
    """
    _run("train-sdpo", locals(), RLConfig(**SDPO_DEFAULTS))


def register(app: typer.Typer, rich_help_panel: str) -> None:
    """Add the RL commands to the root app (one line in persona_cli/cli/__init__.py)."""
    app.command("train-grpo", rich_help_panel=rich_help_panel)(train_grpo)
    app.command("train-sdpo", rich_help_panel=rich_help_panel)(train_sdpo)
