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
from pathlib import Path
from typing import Annotated

import click
import typer
from rich import box
from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console, err_console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.comparison import describe_test, format_p
from persona_cli.dose.sweep import SummarizeJob, SweepJob
from persona_cli.errors import EXIT_CHECK_FAILED

log = logging.getLogger(__name__)
app = typer.Typer(
    help="Dose response: second-stage SFT doses on top of a coupling adapter.", no_args_is_help=True
)


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


@app.command("run")
@configured(SweepJob, flags={"arms": "--arm", "emit_pueue": "--emit-pueue"}, repeat={"arms"})
def run(cfg: SweepJob, out: Path, force: bool) -> None:
    """Train and evaluate every arm x dose x seed cell, then summarise; resumable.

    Each cell is its own run directory under OUT/cells/, so a killed sweep resumes at the
    cells not yet done. Exits 1 when a cell failed (the others still run).
    """
    from persona_cli.dose.sweep import run_sweep

    with ProgressDisplay("dose-sweep") as display:
        outcome = run_sweep(cfg, out, _in_process, force=force, progress=display)
    if outcome.already_done:
        say_already_done(out)
    if cfg.emit_pueue:
        typer.echo(outcome.emitted, nl=False)
        return
    if cfg.emit_slurm is not None:
        msg = f"sbatch script: {outcome.emitted} ({outcome.n_cells} array tasks)"
        console.print(msg, highlight=False)
        return
    if outcome.summary is not None:
        _print_summary(outcome.summary)
        console.print(f"plot: {out / 'dose_response.png'}", highlight=False)
    if outcome.failed:
        for o in outcome.failed:
            err_console.print(
                f"cell {o.cell} failed in {o.stage} (exit {o.exit_code})", highlight=False
            )
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("status")
def status(sweep_dir: Annotated[Path, typer.Argument(help="The sweep's --out directory.")]) -> None:
    """List done, running, trained-but-not-evaluated and missing cells."""
    from persona_cli.dose import plan as plan_lib
    from persona_cli.dose.sweep import load_sweep

    _, cells, _ = load_sweep(sweep_dir)
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
@configured(SummarizeJob, arguments={"sweep_dir"}, run_dir=False)
def summarize(cfg: SummarizeJob) -> None:
    """Write summary.json and dose_response.png from the cells done so far.

    Refuses (exit 3, naming each field) when finished cells differ in protocol other than by
    their dose, e.g. a cell evaluated by hand with other sampling settings. --test and
    --alternative default to what the sweep recorded. A finished sweep (DONE) is only printed:
    its files are sealed by its manifest; asked for other tests than it recorded, the summary is
    recomputed from the cells and printed, not written.
    """
    from persona_cli.dose.sweep import summarize_sweep

    outcome = summarize_sweep(cfg)
    _print_summary(outcome.summary)
    if not outcome.written:
        err_console.print(
            f"{cfg.sweep_dir} is finished: this summary (--test {outcome.settings.test} "
            f"--alternative {outcome.settings.alternative}) was recomputed from its cells and "
            "not written",
            highlight=False,
        )
