"""The dose-response grid: arms x doses x seeds, each cell two ordinary commands.

A cell trains a second-stage LoRA on top of the coupling adapter for `dose` optimizer steps
(warmup 0, cosine schedule) on one arm's data, then evaluates marker survival with the coupling
adapter and the new one stacked. Dose 0 is the coupling adapter alone (one cell per seed,
shared by all arms). Cells are described as the exact `persona-cli` argument lists that run
them, so the in-process runner, the per-GPU fan-out, `--emit-pueue` and `--emit-slurm` all run
the same thing (the runner evaluates many cells with one eval-markers adapter-set invocation,
whose run directories are the cells' own: `eval_sets_argv`).

Schedules. `per-dose` (the research log's protocol): one training run per cell, its cosine
schedule laid over exactly `dose` steps. `one-run`: one training run per arm and seed over the
largest dose, keeping its adapter at every dose (`train-sft --save-at`), each cell evaluating
`RUN@step_DOSE`; fewer steps in all (the largest dose instead of their sum) but one LR schedule
for all doses, so a cell of dose 5 saw the first 5 steps of a 375-step schedule. The guard keeps
the two apart (`schedule`: per-run vs one-run).

    SWEEP/cells/em_d0025_s42/train/   a train-sft run directory (per-dose)
    SWEEP/runs/em_s42/                the arm's train-sft run with step_N checkpoints (one-run)
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
PER_DOSE, ONE_RUN = "per-dose", "one-run"
SCHEDULES = (PER_DOSE, ONE_RUN)
EVAL_SETS = "eval_sets"  # SWEEP/eval_sets[_gpuN].json: the cells of one adapter-set evaluation


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
    schedule: str = PER_DOSE  # per-dose or one-run (module doc)

    def to_dict(self) -> dict[str, Any]:
        # `schedule` only when one-run, so sweeps started before it existed still resume.
        extra = {"schedule": self.schedule} if self.schedule != PER_DOSE else {}
        return extra | {
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
            schedule=d.get("schedule", PER_DOSE),  # absent: a sweep from before one-run
        )


@dataclass(frozen=True)
class Cell:
    arm: str
    dose: int
    seed: int
    path: Path
    train_argv: tuple[str, ...] | None  # None for dose 0
    eval_argv: tuple[str, ...]
    adapters: tuple[str, ...] = ()  # the stack eval_argv evaluates
    train_dir: Path | None = None  # train_argv's run directory (shared by cells under one-run)

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
    if config.schedule not in SCHEDULES:
        raise UserError(f"--schedule {config.schedule!r}: choose from {', '.join(SCHEDULES)}")


def _train_argv(config: SweepConfig, data: str, steps: int, seed: int, out: Path,
                save_at: tuple[int, ...] = ()) -> tuple[str, ...]:  # fmt: skip
    keep = ("--save-at", ",".join(map(str, save_at))) if save_at else ()
    return (
        "train-sft",
        "--model",
        config.model,
        "--data",
        str(data),
        "--adapter",
        config.coupling,
        "--max-steps",
        str(steps),
        *keep,
        "--warmup-steps",
        "0",
        "--lr-scheduler",
        "cosine",
        "--seed",
        str(seed),
        "--out",
        str(out),
        *config.train_args,
    )


def plan(config: SweepConfig, sweep_dir: Path) -> list[Cell]:
    cells: list[Cell] = []
    doses = sorted(set(config.doses) | {0})
    trained = tuple(d for d in doses if d)
    for seed in config.seeds:
        for dose in doses:
            for arm, data in config.arms if dose else [(BASE_ARM, None)]:
                path = sweep_dir / "cells" / f"{arm}_d{dose:04d}_s{seed}"
                adapters = [config.coupling]
                train, train_dir = None, None
                if dose and config.schedule == ONE_RUN:
                    train_dir = sweep_dir / "runs" / f"{arm}_s{seed}"
                    train = _train_argv(config, str(data), max(trained), seed, train_dir, trained)
                    adapters.append(f"{train_dir}@step_{dose}")
                elif dose:
                    train_dir = path / "train"
                    train = _train_argv(config, str(data), dose, seed, train_dir)
                    adapters.append(str(train_dir))
                evaluate = (
                    "eval-markers",
                    "--model",
                    config.model,
                    *(x for a in adapters for x in ("--adapter", a)),
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
                cells.append(
                    Cell(arm, dose, seed, path, train, evaluate, tuple(adapters), train_dir)
                )
    return cells


def eval_sets(cells: list[Cell], sweep_dir: Path) -> list[dict[str, Any]]:
    """The adapter-set document (`persona_cli.eval.adapter_sets`) evaluating `cells`, each into
    its own `eval/` run directory: what each cell's `eval_argv` would write."""
    return [
        {
            "name": c.name,
            "adapters": list(c.adapters),
            "out": str((c.path / "eval").relative_to(sweep_dir)),
            "seed": c.seed,
        }
        for c in cells
    ]


def eval_sets_argv(config: SweepConfig, sweep_dir: Path, sets_file: Path) -> tuple[str, ...]:
    """One eval-markers invocation for the cells in `sets_file` (see `eval_sets`)."""
    return (
        "eval-markers",
        "--model",
        config.model,
        "--adapter-sets",
        str(sets_file),
        "--source",
        config.source,
        "--marker",
        config.marker,
        "--out",
        str(sweep_dir),
        *config.eval_args,
    )


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
        elif c.train_dir is not None and is_done(c.train_dir):
            state = "trained"  # evaluation still missing
        else:
            state = "missing"
        rows.append({"cell": c.name, "arm": c.arm, "dose": c.dose, "seed": c.seed, "state": state})
    return rows


def pueue_script(cells: list[Cell], sweep_dir: Path, group: str = "dose") -> str:
    """A bash script that queues every unfinished cell with pueue (train, then eval after it;
    a training shared by cells, under one-run, is queued once) and the summary after all of
    them. Task ids are captured with --print-task-id."""
    exe = "persona-cli"
    lines = [
        "#!/usr/bin/env bash",
        "set -euo pipefail",
        f"pueue group add {shlex.quote(group)} 2>/dev/null || true",
        "after=()",
    ]
    trainings: dict[Path, str] = {}  # train_dir -> the shell variable holding its task id
    for c in cells:
        if c.done:
            continue
        label = shlex.quote(c.name)
        queue = f"pueue add --print-task-id --group {shlex.quote(group)} --label {label}"
        if c.train_argv is not None and c.train_dir is not None:
            if c.train_dir not in trainings:
                trainings[c.train_dir] = f"t{len(trainings)}"
                lines.append(
                    f"{trainings[c.train_dir]}=$({queue} -- {exe} {shlex.join(c.train_argv)})"
                )
            t = trainings[c.train_dir]
            lines.append(f'e=$({queue} --after "${t}" -- {exe} {shlex.join(c.eval_argv)})')
        else:
            lines.append(f"e=$({queue} -- {exe} {shlex.join(c.eval_argv)})")
        lines.append('after+=("$e")')
    after = ' --after "${after[@]}"' if any(not c.done for c in cells) else ""
    lines.append(
        f"pueue add --group {shlex.quote(group)} --label summary{after} "
        f"-- {exe} dose-sweep summarize {shlex.quote(str(sweep_dir))}"
    )
    return "\n".join(lines) + "\n"


def slurm_script(cells: list[Cell], sweep_dir: Path) -> str:
    """An sbatch array script, one cell per task (task i runs cells[i]). A task whose cell is
    DONE exits 0 at once; a training shared by cells (one-run) is run under `flock`, so the
    first task trains and the others wait for it, then find it DONE. `$PERSONA_CLI` overrides
    the executable (default: persona-cli on PATH)."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        "#SBATCH --job-name=dose-sweep",
        f"#SBATCH --array=0-{len(cells) - 1}",
        f"#SBATCH --output={sweep_dir}/slurm/%A_%a.log",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        f"# dose sweep {sweep_dir}: {len(cells)} cells, one per array task. Submit with",
        f"#   mkdir -p {q(str(sweep_dir / 'slurm'))} && sbatch THIS_FILE",
        "# and, when the array is done (sbatch --dependency=afterany:JOBID ...):",
        f"#   persona-cli dose-sweep summarize {q(str(sweep_dir))}",
        "set -euo pipefail",
        "exe=${PERSONA_CLI:-persona-cli}",
        "task=${SLURM_ARRAY_TASK_ID:?run as an sbatch array task (SLURM_ARRAY_TASK_ID unset)}",
        'case "$task" in',
    ]
    for i, c in enumerate(cells):
        done = q(str(c.path / "eval" / "DONE"))
        lines += [
            f"{i})",
            f'    if [[ -f {done} ]]; then echo "cell {c.name}: done"; exit 0; fi',
        ]
        if c.train_argv is not None and c.train_dir is not None:
            lock = q(f"{c.train_dir}.lock")
            lines += [
                f"    mkdir -p {q(str(c.train_dir.parent))}",
                f'    flock {lock} "$exe" {shlex.join(c.train_argv)}',
            ]
        lines += [f'    exec "$exe" {shlex.join(c.eval_argv)}', "    ;;"]
    lines += ['*) echo "no cell for array task $task" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def cell_env(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env
