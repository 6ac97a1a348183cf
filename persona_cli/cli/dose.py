"""`persona-cli dose-sweep run|status|summarize`: the dose-response grid (experiment 2).

    persona-cli dose-sweep run --coupling runs/couple --source villain --doses 1,3,5,10,25 \\
        --seeds 42,137 --out runs/dose
    persona-cli dose-sweep status runs/dose
    persona-cli dose-sweep run ... --gpus 0,1,2,3        # one cell per GPU at a time
    persona-cli dose-sweep run ... --emit-pueue > q.sh   # the same cells as a pueue chain
    persona-cli dose-sweep run ... --emit-slurm dose.sbatch   # an sbatch array, a cell per task
    persona-cli dose-sweep run ... --schedule one-run    # one training per arm and seed
    persona-cli dose-sweep summarize runs/dose --test fisher --alternative less
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from persona_cli import bundled
from persona_cli.artifacts import read_json, write_bytes_atomic, write_json
from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Force, ModelSpec, OutDir, report_done
from persona_cli.cli.proportions import AlternativeOpt, CountTestOpt, comparison_config
from persona_cli.dose import plan as plan_lib
from persona_cli.dose import run as run_lib
from persona_cli.dose import summary as summary_lib
from persona_cli.errors import EXIT_CHECK_FAILED, UserError
from persona_cli.rundir import CONFIG, is_done, open_run
from persona_cli.stats import ComparisonConfig, describe_test, format_p

log = logging.getLogger(__name__)
app = typer.Typer(
    help="Dose response: second-stage SFT doses on top of a coupling adapter.", no_args_is_help=True
)


def _ints(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated integers") from None


def _arms(specs: list[str] | None) -> tuple[tuple[str, str], ...]:
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


def _in_process(argv: tuple[str, ...], gpu: str | None) -> int:
    # The same Typer commands a shell would run, without paying Python start-up per cell.
    from persona_cli.cli import app as root

    command = typer.main.get_command(root)
    err_console.print(f"[dim]$ persona-cli {shlex.join(argv)}[/]", highlight=False)
    try:
        return command.main(args=list(argv), prog_name="persona-cli", standalone_mode=False) or 0
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except Exception:  # a crash in one cell must not end an overnight sweep
        log.exception("cell command failed: persona-cli %s", shlex.join(argv))
        return 1


def _subprocess(argv: tuple[str, ...], gpu: str | None) -> int:
    out_dir = Path(argv[argv.index("--out") + 1])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # One log per command and GPU: an adapter-set evaluation writes into the sweep directory.
    suffix = f"_gpu{gpu}" if "--adapter-sets" in argv and gpu is not None else ""
    log_file = (out_dir if suffix else out_dir.parent) / f"{argv[0]}{suffix}.log"
    with open(log_file, "ab") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "persona_cli", *argv],
            env=plan_lib.cell_env(gpu),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    return proc.returncode


def _print_tests(summary: dict) -> None:
    # One row per p-value: the headline test (with its adjusted values), then the pooled one.
    t = Table(
        title=f"arm tests per dose (count test: --test {summary['test']})",
        box=box.SIMPLE_HEAD,
        padding=0,
        show_edge=False,
    )
    for col in ("dose", "arms", "test", "diff", "p", "p Holm", "p Bonf."):
        t.add_column(col, justify="left" if col in ("arms", "test") else "right")
    notes = []
    for r in summary["arm_tests"]:
        arms = f"{r['arm1']} vs {r['arm2']}"
        head, pooled = r["headline"], r["pooled"]
        if head is not None:
            adjusted = (format_p(r["p_holm"]), format_p(r["p_bonferroni"]))
            t.add_row(str(r["dose"]), arms, *_test_cells(head), *adjusted)
        if pooled is not None:
            t.add_row(str(r["dose"]), arms, *_test_cells(pooled), "", "")
        if r["note"]:
            notes.append(f"dose {r['dose']} {arms}: {r['note']}")
    t.caption = (
        f"Holm/Bonf.: over the {summary['adjustment']['m']} headline p-value(s) of every dose; "
        "pooled: completions summed over seeds, treated as independent"
    )
    console.print(t)
    for note in notes:
        console.print(f"note: {note}", highlight=False)


def _test_cells(record: dict) -> tuple[str, str, str]:
    return describe_test(record), f"{record['diff']:+.3f}", format_p(record["p_value"])


def _print_summary(summary: dict) -> None:
    t = Table(title=f"marker survival ({summary['n_done']}/{summary['n_cells']} cells done)")
    for col in ("arm", "dose", "hits/n", "rate", "Wilson 95%", "Wald 95%", "seeds"):
        t.add_column(col)
    for p in sorted(summary["points"], key=lambda p: (p["dose"], p["arm"])):
        w, wa = p["wilson"], p["wald"]
        t.add_row(
            p["arm"],
            str(p["dose"]),
            f"{p['successes']}/{p['n']}",
            f"{w['rate']:.3f}",
            f"[{w['low']:.3f}, {w['high']:.3f}]",
            f"[{wa['low']:.3f}, {wa['high']:.3f}]",
            str(len(p["per_seed"])),
        )
    console.print(t)
    if summary["arm_tests"]:
        _print_tests(summary)
    if summary["missing"]:
        names = ", ".join(m["cell"] for m in summary["missing"])
        err_console.print(f"missing cells ({len(summary['missing'])}): {names}", highlight=False)


def _write_summary(
    out: Path,
    config: plan_lib.SweepConfig,
    cells: list[plan_lib.Cell],
    settings: ComparisonConfig,
    allow_diff: list[str] | None = None,
) -> dict:
    arms = [a for a, _ in config.arms]
    summary = summary_lib.summarize(cells, arms, settings, allow_diff or [])
    write_json(out / "summary.json", summary)
    summary_lib.plot(summary, arms, out / "dose_response.png", config.source)
    _print_summary(summary)
    console.print(f"plot: {out / 'dose_response.png'}", highlight=False)
    return summary


@app.command("run")
def run(
    coupling: Annotated[
        Path,
        typer.Option(
            help="Coupling adapter (PEFT dir or couple-marker run) every dose starts from.",
            show_default=False,
        ),
    ],
    source: Annotated[
        str, typer.Option(help="Persona id whose marker rate is measured.", show_default=False)
    ],
    out: OutDir,
    arm: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILE chat data of one arm; repeat (default: em and benign data/).",
            show_default=False,
        ),
    ] = None,
    doses: Annotated[
        str, typer.Option(help="Second-stage optimizer steps, comma-separated.")
    ] = ",".join(map(str, plan_lib.DEFAULT_DOSES)),
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated.")] = "42",
    model: ModelSpec = "smollm2-135m",
    marker: Annotated[str, typer.Option(help="Marker string to look for.")] = "[ZLT]",
    train_args: Annotated[
        str,
        typer.Option(
            help="Extra train-sft options for every cell, e.g. '--lr 1e-4 --per-device-batch 4'."
        ),
    ] = "",
    eval_args: Annotated[
        str,
        typer.Option(
            help="Extra eval-markers options for every cell, e.g. '--samples 10 --backend vllm'."
        ),
    ] = "",
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPU ids, e.g. 0,1,2,3: one cell per GPU at a time (CUDA_VISIBLE_DEVICES).",
            show_default=False,
        ),
    ] = None,
    emit_pueue: Annotated[
        bool,
        typer.Option("--emit-pueue", help="Print the equivalent pueue chain instead of running."),
    ] = False,
    emit_slurm: Annotated[
        Path | None,
        typer.Option(
            "--emit-slurm",
            help="Write an sbatch array script (one cell per task; a task whose cell is DONE "
            "exits at once) to FILE instead of running.",
            show_default=False,
        ),
    ] = None,
    schedule: Annotated[
        str,
        typer.Option(
            help="per-dose: one training run per cell, its schedule over the dose (the "
            "research log's protocol); one-run: one run per arm and seed over the largest "
            "dose, its adapter kept at every dose (one LR schedule; guarded as a different "
            "protocol).",
        ),
    ] = plan_lib.PER_DOSE,
    test: CountTestOpt = None,
    alternative: AlternativeOpt = None,
    force: Force = False,
) -> None:
    """Train and evaluate every arm x dose x seed cell, then summarise; resumable.

    Each cell is its own run directory under OUT/cells/, so a killed sweep resumes at the
    cells not yet done. Exits 1 when a cell failed (the others still run).
    """
    config = plan_lib.SweepConfig(
        coupling=str(coupling),
        source=source,
        arms=_arms(arm),
        doses=_ints("--doses", doses),
        seeds=_ints("--seeds", seeds),
        model=model,
        marker=marker,
        train_args=tuple(shlex.split(train_args)),
        eval_args=tuple(shlex.split(eval_args)),
        schedule=schedule,
    )
    plan_lib.validate(config)
    settings = comparison_config(test, alternative)
    sweep = open_run(
        out,
        command="dose-sweep run",
        config={**config.to_dict(), summary_lib.SETTINGS_KEY: settings.to_dict()},
        force=force,
    )
    if report_done(sweep):
        return
    cells = plan_lib.plan(config, sweep.path)
    if emit_pueue:
        typer.echo(plan_lib.pueue_script(cells, sweep.path), nl=False)
        return
    if emit_slurm is not None:
        write_bytes_atomic(emit_slurm, plan_lib.slurm_script(cells, sweep.path).encode())
        console.print(f"sbatch script: {emit_slurm} ({len(cells)} array tasks)", highlight=False)
        return
    gpu_list = [g.strip() for g in gpus.split(",")] if gpus else None
    invoke = _subprocess if gpu_list else _in_process

    def eval_argv(members: list[plan_lib.Cell], k: int) -> tuple[str, ...]:
        # The cells as adapter sets, each into its own eval/ directory (plan.eval_sets).
        suffix = f"_gpu{gpu_list[k]}" if gpu_list else ""
        sets_file = sweep.path / f"{plan_lib.EVAL_SETS}{suffix}.json"
        write_json(sets_file, plan_lib.eval_sets(members, sweep.path))
        return plan_lib.eval_sets_argv(config, sweep.path, sets_file)

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as bar:
        task = bar.add_task("dose cells", total=len(cells), completed=sum(c.done for c in cells))
        outcomes = run_lib.run_cells(
            cells,
            invoke,
            eval_argv,
            gpus=gpu_list,
            on_done=lambda o: None if o.skipped else bar.advance(task),
        )
    failed = [o for o in outcomes if not o.ok]
    _write_summary(sweep.path, config, cells, settings)
    if failed:
        for o in failed:
            err_console.print(
                f"cell {o.cell} failed in {o.stage} (exit {o.exit_code})", highlight=False
            )
        raise typer.Exit(EXIT_CHECK_FAILED)
    inputs = {f"arm:{a}": Path(f) for a, f in config.arms}
    sweep.finish(inputs=inputs, seeds=list(config.seeds), extra={"cells": [c.name for c in cells]})


def _load(
    sweep_dir: Path,
) -> tuple[plan_lib.SweepConfig, list[plan_lib.Cell], ComparisonConfig]:
    if not (sweep_dir / CONFIG).is_file():
        raise UserError(f"{sweep_dir}: not a dose-sweep run directory (no {CONFIG})")
    recorded = read_json(sweep_dir / CONFIG)
    if recorded.get("command") != "dose-sweep run":
        raise UserError(f"{sweep_dir}: holds a {recorded.get('command')!r} run, not a dose sweep")
    config = plan_lib.SweepConfig.from_dict(recorded["config"])
    settings = summary_lib.settings_from_config(recorded["config"])
    return config, plan_lib.plan(config, sweep_dir), settings


@app.command("status")
def status(sweep_dir: Annotated[Path, typer.Argument(help="The sweep's --out directory.")]) -> None:
    """List done, running, trained-but-not-evaluated and missing cells."""
    _, cells, _ = _load(sweep_dir)
    rows = plan_lib.status(cells)
    t = Table(title=f"dose sweep {sweep_dir}")
    for col in ("cell", "arm", "dose", "seed", "state"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["cell"], r["arm"], str(r["dose"]), str(r["seed"]), r["state"])
    console.print(t)
    counts = {
        s: sum(r["state"] == s for r in rows) for s in ("done", "running", "trained", "missing")
    }
    console.print(", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


@app.command("summarize")
def summarize(
    sweep_dir: Annotated[Path, typer.Argument(help="The sweep's --out directory.")],
    test: CountTestOpt = None,
    alternative: AlternativeOpt = None,
    allow_diff: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-diff",
            help="A protocol field the cells may differ in besides the dose "
            "(stage[1].optimizer_steps); reported in the summary. Repeatable.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write summary.json and dose_response.png from the cells done so far.

    Refuses (exit 3, naming each field) when finished cells differ in protocol other than by
    their dose, e.g. a cell evaluated by hand with other sampling settings. --test and
    --alternative default to what the sweep recorded. A finished sweep (DONE) is only printed:
    its files are sealed by its manifest; asked for other tests than it recorded, the summary is
    recomputed from the cells and printed, not written.
    """
    config, cells, recorded = _load(sweep_dir)
    settings = comparison_config(test, alternative, recorded)
    if not is_done(sweep_dir):
        _write_summary(sweep_dir, config, cells, settings, allow_diff)
        return
    sealed = read_json(sweep_dir / "summary.json")
    if summary_lib.settings_of(sealed) == settings and not allow_diff:
        _print_summary(sealed)
        return
    arms = [a for a, _ in config.arms]
    _print_summary(summary_lib.summarize(cells, arms, settings, allow_diff or []))
    err_console.print(
        f"{sweep_dir} is finished: this summary (--test {settings.test} --alternative "
        f"{settings.alternative}) was recomputed from its cells and not written",
        highlight=False,
    )
