"""`dose-sweep run` and `dose-sweep summarize` as library functions: configs, runs, outcomes.

run: the arm x dose x seed grid of ordinary train-sft + eval-markers run directories under
OUT/cells/ (`persona_cli.dose.plan`), run by `persona_cli.dose.run` (every training first, then
one adapter-set evaluation pass), then summarised (`persona_cli.dose.summary`); or, instead of
running, the same cells as a pueue chain or an sbatch array script. The caller passes
`invoke(argv, gpu)`, which runs one persona-cli command, so this module imports nothing from
the CLI. A sweep with a failed cell writes its summary and no manifest (re-running continues).

summarize: summary.json and dose_response.png from the cells done so far; a finished sweep's
sealed summary is only read (asked for other tests, it is recomputed and not written).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli import fields as common
from persona_cli.artifacts import read_json, write_bytes_atomic, write_json
from persona_cli.comparison import ComparisonConfig
from persona_cli.dose import plan as plan_lib
from persona_cli.errors import UserError
from persona_cli.fields import option
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.rundir import CONFIG, is_done, open_run

RUN_COMMAND = "dose-sweep run"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "dose_response.png"
_RECORDED = "default: as the sweep recorded"


@dataclass(frozen=True)
class SweepJob:
    """dose-sweep run: the grid, how each cell trains and is evaluated, how it is run."""

    coupling: str = option(
        help="Coupling adapter (PEFT dir or couple-marker run) every dose starts from."
    )
    source: str = option(help="Persona id whose marker rate is measured.")
    arms: tuple[str, ...] = option(
        (), "NAME=FILE chat data of one arm; repeat (default: em and benign data/)."
    )
    doses: tuple[int, ...] = option(
        plan_lib.DEFAULT_DOSES, "Second-stage optimizer steps, comma-separated."
    )
    seeds: tuple[int, ...] = option((42,), "Seeds, comma-separated.")
    model: str = common.model()
    marker: str = option("[ZLT]", "Marker string to look for.")
    train_args: str = option(
        "", "Extra train-sft options for every cell, e.g. '--lr 1e-4 --per-device-batch 4'."
    )
    eval_args: str = option(
        "", "Extra eval-markers options for every cell, e.g. '--samples 10 --backend vllm'."
    )
    schedule: str = option(
        plan_lib.PER_DOSE,
        "per-dose: one training run per cell, its schedule over the dose (the research log's "
        "protocol); one-run: one run per arm and seed over the largest dose, its adapter kept "
        "at every dose (one LR schedule; guarded as a different protocol).",
    )
    gpus: str | None = option(
        None, "GPU ids, e.g. 0,1,2,3: one cell per GPU at a time (CUDA_VISIBLE_DEVICES)."
    )
    emit_pueue: bool = option(False, "Print the equivalent pueue chain instead of running.")
    emit_slurm: str | None = option(
        None,
        "Write an sbatch array script (one cell per task; a task whose cell is DONE exits at "
        "once) to FILE instead of running.",
    )
    comparison: ComparisonConfig = field(
        default_factory=ComparisonConfig, metadata={"help": "The arm tests per dose."}
    )

    def sweep_config(self) -> plan_lib.SweepConfig:
        """The grid as config.json records it (`plan.SweepConfig`)."""
        return plan_lib.SweepConfig(
            coupling=self.coupling,
            source=self.source,
            arms=_arms(self.arms),
            doses=self.doses,
            seeds=self.seeds,
            model=self.model,
            marker=self.marker,
            train_args=tuple(shlex.split(self.train_args)),
            eval_args=tuple(shlex.split(self.eval_args)),
            schedule=self.schedule,
        )


@dataclass(frozen=True)
class SummarizeJob:
    """dose-sweep summarize: which sweep, and which tests (default: what it recorded)."""

    sweep_dir: str = option(help="The sweep's --out directory.")
    test: str | None = option(None, f"Count test: auto, fisher or z ({_RECORDED}).")
    alternative: str | None = option(
        None, f"two-sided, less (arm 1 < arm 2) or greater ({_RECORDED})."
    )
    allow_diff: tuple[str, ...] = option(
        (),
        "A protocol field the cells may differ in besides the dose (stage[1].optimizer_steps); "
        "reported in the summary. Repeatable.",
    )


@dataclass
class SweepOutcome:
    """What a call did: `emitted` holds a pueue chain (text) or the sbatch script's path."""

    out: Path
    summary: dict[str, Any] | None = None
    failed: list[Any] = field(default_factory=list)
    already_done: bool = False
    emitted: str | None = None
    n_cells: int = 0


@dataclass
class SummaryOutcome:
    summary: dict[str, Any]
    written: bool  # False: a finished sweep's summary, recomputed for other tests and printed
    settings: ComparisonConfig


def _arms(specs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not specs:
        return (
            ("em", str(bundled.em_dataset_file())),
            ("benign", str(bundled.benign_dataset_file())),
        )
    arms = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--arm {spec!r}: expected NAME=FILE")
        arms.append((name, path))
    return tuple(arms)


def write_summary(
    out: Path,
    config: plan_lib.SweepConfig,
    cells: list[plan_lib.Cell],
    settings: ComparisonConfig,
    allow_diff: tuple[str, ...] = (),
) -> dict[str, Any]:
    """summary.json and dose_response.png of the cells done so far (the one writer of both)."""
    from persona_cli.dose import summary as summary_lib

    arms = [a for a, _ in config.arms]
    summary = summary_lib.summarize(cells, arms, settings, list(allow_diff))
    write_json(out / SUMMARY_FILE, summary)
    summary_lib.plot(summary, arms, out / PLOT_FILE, config.source)
    return summary


def run_sweep(
    job: SweepJob,
    out: Path,
    invoke: Any,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> SweepOutcome:
    """Run (or emit) the sweep `job` into `out` (module doc); `invoke(argv, gpu)` runs one
    persona-cli command in-process when no GPUs are named (else a subprocess per GPU)."""
    from persona_cli.dose import run as run_lib
    from persona_cli.dose import summary as summary_lib

    config = job.sweep_config()
    plan_lib.validate(config)
    settings = job.comparison.check()
    sweep = open_run(
        out,
        command=RUN_COMMAND,
        config={**config.to_dict(), summary_lib.SETTINGS_KEY: settings.to_dict()},
        force=force,
    )
    if sweep.done:
        return SweepOutcome(out, read_json(sweep.file(SUMMARY_FILE)), already_done=True)
    cells = plan_lib.plan(config, sweep.path)
    if job.emit_pueue:
        return SweepOutcome(out, emitted=plan_lib.pueue_script(cells, sweep.path))
    if job.emit_slurm is not None:
        script = Path(job.emit_slurm)
        write_bytes_atomic(script, plan_lib.slurm_script(cells, sweep.path).encode())
        return SweepOutcome(out, emitted=str(script), n_cells=len(cells))
    gpu_list = [g.strip() for g in job.gpus.split(",")] if job.gpus else None

    def eval_argv(members: list[plan_lib.Cell], k: int) -> tuple[str, ...]:
        # The cells as adapter sets, each into its own eval/ directory (plan.eval_sets).
        suffix = f"_gpu{gpu_list[k]}" if gpu_list else ""
        sets_file = sweep.path / f"{plan_lib.EVAL_SETS}{suffix}.json"
        write_json(sets_file, plan_lib.eval_sets(members, sweep.path))
        return plan_lib.eval_sets_argv(config, sweep.path, sets_file)

    progress.begin("", len(cells), done=sum(c.done for c in cells), unit="cells")
    outcomes = run_lib.run_cells(
        cells,
        run_lib.run_subprocess if gpu_list else invoke,
        eval_argv,
        gpus=gpu_list,
        on_done=lambda o: None if o.skipped else progress.advance(""),
    )
    failed = [o for o in outcomes if not o.ok]
    summary = write_summary(sweep.path, config, cells, settings)
    if not failed:
        inputs = {f"arm:{a}": Path(f) for a, f in config.arms}
        sweep.finish(
            inputs=inputs, seeds=list(config.seeds), extra={"cells": [c.name for c in cells]}
        )
    return SweepOutcome(out, summary, failed=failed, n_cells=len(cells))


def load_sweep(
    sweep_dir: Path,
) -> tuple[plan_lib.SweepConfig, list[plan_lib.Cell], ComparisonConfig]:
    """A sweep directory's grid, its cells and the tests it recorded."""
    from persona_cli.dose import summary as summary_lib

    if not (sweep_dir / CONFIG).is_file():
        raise UserError(f"{sweep_dir}: not a dose-sweep run directory (no {CONFIG})")
    recorded = read_json(sweep_dir / CONFIG)
    if recorded.get("command") != RUN_COMMAND:
        raise UserError(f"{sweep_dir}: holds a {recorded.get('command')!r} run, not a dose sweep")
    config = plan_lib.SweepConfig.from_dict(recorded["config"])
    settings = summary_lib.settings_from_config(recorded["config"])
    return config, plan_lib.plan(config, sweep_dir), settings


def summarize_sweep(job: SummarizeJob) -> SummaryOutcome:
    """Write (unfinished sweep) or recompute (finished, other tests) the sweep's summary."""
    from persona_cli.dose import summary as summary_lib

    sweep_dir = Path(job.sweep_dir)
    config, cells, recorded = load_sweep(sweep_dir)
    given = {k: v for k, v in (("test", job.test), ("alternative", job.alternative)) if v}
    settings = ComparisonConfig(**{**recorded.to_dict(), **given}).check()
    if not is_done(sweep_dir):
        summary = write_summary(sweep_dir, config, cells, settings, job.allow_diff)
        return SummaryOutcome(summary, True, settings)
    sealed = read_json(sweep_dir / SUMMARY_FILE)
    if summary_lib.settings_of(sealed) == settings and not job.allow_diff:
        return SummaryOutcome(sealed, True, settings)
    arms = [a for a, _ in config.arms]
    summary = summary_lib.summarize(cells, arms, settings, list(job.allow_diff))
    return SummaryOutcome(summary, False, settings)
