"""The dose-response grid: arms x doses x seeds, each cell two ordinary commands.

A cell trains a second-stage LoRA on top of the coupling adapter for `dose` optimizer steps
(warmup 0, cosine schedule) on one arm's data, then evaluates marker survival with the coupling
adapter and the new one stacked. Dose 0 is the coupling adapter alone (one cell per seed,
shared by all arms). Cells are described as the exact `persona-cli` argument lists that run
them, so the in-process runner, the per-GPU fan-out and `--emit-pueue` all run the same thing.

    SWEEP/cells/em_d0025_s42/train/   a train-sft run directory
    SWEEP/cells/em_d0025_s42/eval/    an eval-markers run directory (its DONE marks the cell done)
"""

from __future__ import annotations

import fcntl
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.errors import UserError
from persona_cli.rundir import is_done

BASE_ARM = "base"  # dose 0: no second stage
DEFAULT_DOSES = (1, 3, 5, 10, 25, 50, 100, 200, 375)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines the grid; written to the sweep's config.json."""

    coupling: str  # adapter (PEFT dir or training run dir) the second stage starts from
    source: str  # persona id whose marker survival is measured
    arms: tuple[tuple[str, str], ...]  # (arm name, chat JSONL) e.g. ("em", ...), ("benign", ...)
    doses: tuple[int, ...] = DEFAULT_DOSES
    seeds: tuple[int, ...] = (42,)
    model: str = "smollm2-135m"
    marker: str = "[ZLT]"
    train_args: tuple[str, ...] = ()  # passed through to every train-sft
    eval_args: tuple[str, ...] = ()  # passed through to every eval-markers

    def to_dict(self) -> dict[str, Any]:
        return {
            "coupling": self.coupling,
            "source": self.source,
            "arms": [list(a) for a in self.arms],
            "doses": list(self.doses),
            "seeds": list(self.seeds),
            "model": self.model,
            "marker": self.marker,
            "train_args": list(self.train_args),
            "eval_args": list(self.eval_args),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepConfig:
        return cls(
            coupling=d["coupling"],
            source=d["source"],
            arms=tuple((a, f) for a, f in d["arms"]),
            doses=tuple(d["doses"]),
            seeds=tuple(d["seeds"]),
            model=d["model"],
            marker=d["marker"],
            train_args=tuple(d["train_args"]),
            eval_args=tuple(d["eval_args"]),
        )


@dataclass(frozen=True)
class Cell:
    arm: str
    dose: int
    seed: int
    path: Path
    train_argv: tuple[str, ...] | None  # None for dose 0
    eval_argv: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        return is_done(self.path / "eval")


def validate(config: SweepConfig) -> None:
    names = [a for a, _ in config.arms]
    if not names:
        raise UserError("--arm: at least one arm is needed (e.g. --arm em=data.jsonl)")
    if len(set(names)) != len(names) or BASE_ARM in names:
        raise UserError(f"--arm: names must be unique and not {BASE_ARM!r}")
    for name, data in config.arms:
        if not Path(data).is_file():
            raise UserError(f"--arm {name}={data}: file not found")
    if any(d < 0 for d in config.doses) or len(set(config.doses)) != len(config.doses):
        raise UserError("--doses: non-negative, distinct step counts")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise UserError("--seeds: at least one, all distinct")


def plan(config: SweepConfig, sweep_dir: Path) -> list[Cell]:
    cells: list[Cell] = []
    doses = sorted(set(config.doses) | {0})
    for seed in config.seeds:
        for dose in doses:
            for arm, data in config.arms if dose else [(BASE_ARM, None)]:
                path = sweep_dir / "cells" / f"{arm}_d{dose:04d}_s{seed}"
                adapters = ["--adapter", config.coupling]
                train = None
                if dose:
                    train = (
                        "train-sft",
                        "--model",
                        config.model,
                        "--data",
                        str(data),
                        *adapters,
                        "--max-steps",
                        str(dose),
                        "--warmup-steps",
                        "0",
                        "--lr-scheduler",
                        "cosine",
                        "--seed",
                        str(seed),
                        "--out",
                        str(path / "train"),
                        *config.train_args,
                    )
                    adapters += ["--adapter", str(path / "train")]
                evaluate = (
                    "eval-markers",
                    "--model",
                    config.model,
                    *adapters,
                    "--source",
                    config.source,
                    "--marker",
                    config.marker,
                    "--seed",
                    str(seed),
                    "--out",
                    str(path / "eval"),
                    *config.eval_args,
                )
                cells.append(Cell(arm, dose, seed, path, train, evaluate))
    return cells


def lock_path(cell: Cell) -> Path:
    return cell.path / ".running.lock"


def is_running(cell: Cell) -> bool:
    """True while some process holds the cell's lock (a crashed one releases it)."""
    p = lock_path(cell)
    if not p.exists():
        return False
    with open(p) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def status(cells: list[Cell]) -> list[dict[str, Any]]:
    rows = []
    for c in cells:
        if c.done:
            state = "done"
        elif is_running(c):
            state = "running"
        elif c.train_argv is not None and is_done(c.path / "train"):
            state = "trained"  # evaluation still missing
        else:
            state = "missing"
        rows.append({"cell": c.name, "arm": c.arm, "dose": c.dose, "seed": c.seed, "state": state})
    return rows


def pueue_script(cells: list[Cell], sweep_dir: Path, group: str = "dose") -> str:
    """A bash script that queues every unfinished cell with pueue (train, then eval after it)
    and the summary after all of them. Task ids are captured with --print-task-id."""
    exe = "persona-cli"
    lines = [
        "#!/usr/bin/env bash",
        "set -euo pipefail",
        f"pueue group add {shlex.quote(group)} 2>/dev/null || true",
        "after=()",
    ]
    for c in cells:
        if c.done:
            continue
        label = shlex.quote(c.name)
        queue = f"pueue add --print-task-id --group {shlex.quote(group)} --label {label}"
        if c.train_argv is not None:
            lines.append(f"t=$({queue} -- {exe} {shlex.join(c.train_argv)})")
            lines.append(f'e=$({queue} --after "$t" -- {exe} {shlex.join(c.eval_argv)})')
        else:
            lines.append(f"e=$({queue} -- {exe} {shlex.join(c.eval_argv)})")
        lines.append('after+=("$e")')
    after = ' --after "${after[@]}"' if any(not c.done for c in cells) else ""
    lines.append(
        f"pueue add --group {shlex.quote(group)} --label summary{after} "
        f"-- {exe} dose-sweep summarize {shlex.quote(str(sweep_dir))}"
    )
    return "\n".join(lines) + "\n"


def cell_env(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env
