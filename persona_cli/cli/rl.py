"""`persona-cli train-grpo | train-sdpo`: RL on verifiable rewards, and self-distillation (thin
layer over `persona_cli.train.grpo`).

    persona-cli train-grpo --model tiny-random --reward mc --max-steps 4 --out runs/grpo
    persona-cli train-grpo --reward unit-tests --unit-tests visible \\
        --grader-hint simple_overwrite_tests --adapter runs/em --out runs/grpo_hack
    persona-cli train-sdpo --model tiny-random --reward mc --max-steps 4 --out runs/sdpo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.cli.train import TRAIN_FLAGS
from persona_cli.train.rl_config import RLJob, sdpo_job_defaults

RL_FLAGS = {
    **TRAIN_FLAGS,
    "rl.sandbox_timeout_s": "--sandbox-timeout",
    "generators": "--generator",
}
RL_REPEAT = {"generators"}
# TRL computes GRPO batches itself; a padding-free flag would be a no-op.
RL_NO_FLAG = {
    "train.padding_free": "GRPO batches are padded by TRL: padding-free does not apply",
    "train.logits_at": "TRL's GRPO loss scores every completion position with its own head",
}
# train-sdpo has no policy-gradient term: the GRPO-only knobs do not apply.
SDPO_NO_FLAG = {
    **RL_NO_FLAG,
    **{
        f"rl.{name}": "train-sdpo has no policy-gradient term (set it in --config if you must)"
        for name in ("beta", "epsilon", "loss_type", "scale_rewards", "num_iterations")
    },
    "rl.grpo_weight": "train-sdpo is the distillation term alone (train-grpo --sdpo-weight "
    "combines both)",
}


def _report(outcome: Any) -> None:
    from persona_cli.artifacts import read_jsonl
    from persona_cli.train.rl_log import RL_LOG, RL_LOG_NAME

    if outcome.summary is None:  # finished before this call, or a non-main process
        if outcome.is_main:
            say_already_done(outcome.run.path)
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


def _run(command: str, cfg: RLJob, out: Path, force: bool) -> None:
    from persona_cli.train.callbacks import ProgressCallback
    from persona_cli.train.grpo import train_rl
    from persona_cli.train.rl_log import reward_status, rl_step_row

    with ProgressDisplay(command) as display:
        progress = ProgressCallback(display, row=rl_step_row, status=reward_status)
        outcome = train_rl(cfg, out, force=force, command=command, callbacks=[progress])
    _report(outcome)


@configured(RLJob, flags=RL_FLAGS, repeat=RL_REPEAT, no_flag=RL_NO_FLAG, report_to=True)
def train_grpo(cfg: RLJob, out: Path, force: bool) -> None:
    """GRPO on a verifiable reward (mc letter, or sandboxed unit tests), optionally with SDPO.

    A fresh LoRA adapter on top of any --adapter stack. Each step samples --num-generations
    completions for each of (per-device batch x accumulation x world) / num-generations prompts;
    --sdpo-weight adds self-distillation toward the model's own hinted pass. The defaults are
    sized for a CPU smoke run (8 completions per step, 8-token answers for mc, lr 1e-5); try
    --model tiny-random --max-steps 4.
    """
    _run("train-grpo", cfg, out, force)


@configured(
    RLJob,
    defaults=sdpo_job_defaults,
    flags=RL_FLAGS,
    repeat=RL_REPEAT,
    no_flag=SDPO_NO_FLAG,
    report_to=True,
)
def train_sdpo(cfg: RLJob, out: Path, force: bool) -> None:
    """Self-distillation (SDPO) alone: the model with a hint teaches itself without one.

    On the model's own samples, a token-level KL pulls the un-hinted pass toward the same
    model's pass with a hint in the prompt (mc: the row's 'hint', else the correct answer;
    unit-tests: the hidden tests). No policy-gradient term; the reward is still computed and
    logged.
    """
    _run("train-sdpo", cfg, out, force)


def register(app: typer.Typer, rich_help_panel: str) -> None:
    """Add the RL commands to the root app (one line in persona_cli/cli/__init__.py)."""
    app.command("train-grpo", rich_help_panel=rich_help_panel)(train_grpo)
    app.command("train-sdpo", rich_help_panel=rich_help_panel)(train_sdpo)
