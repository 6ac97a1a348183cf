"""`persona-cli stats` and `persona-cli compare`: multi-seed summaries and guarded comparisons."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from persona_cli import compare as compare_lib
from persona_cli import report as report_lib
from persona_cli.artifacts import write_bytes_atomic, write_json
from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Force, OutDir, say_already_done
from persona_cli.errors import UserError
from persona_cli.guard import ProtocolMismatch
from persona_cli.rundir import is_done, open_run

Conditions = Annotated[
    list[str],
    typer.Option(
        "--condition",
        "-c",
        help="NAME=GLOB of finished run directories, one per seed; repeat per condition.",
        show_default=False,
    ),
]
Metric = Annotated[
    str,
    typer.Option(
        "--metric",
        help="Dotted path into each run's summary.json, e.g. source.rate.",
        show_default=False,
    ),
]
AllowDiff = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-diff",
        help="A protocol field allowed to differ (the declared "
        "manipulation); reported in the output. Repeatable.",
        show_default=False,
    ),
]
Alpha = Annotated[float, typer.Option(help="1 - confidence level of the intervals.")]


def _conditions(specs: list[str]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise UserError(f"--condition {spec!r}: expected NAME=GLOB")
        if name in out:
            raise UserError(f"--condition {name}: given twice")
        out[name] = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
    return out


def _print(result: dict[str, Any], metric: str) -> None:
    t = Table(title=f"{metric} by condition")
    for col in ("condition", "n", "mean", "±95% CI", "per seed"):
        t.add_column(col)
    for name, c in result["conditions"].items():
        hw = f"{c['half_width']:.4f}" if c["half_width"] is not None else "-"
        per = ", ".join(f"{s}:{v:.3f}" for s, v in zip(c["seeds"], c["values"], strict=True))
        t.add_row(name, str(c["n_seeds"]), f"{c['mean']:.4f}", hw, per)
    console.print(t)
    for d in result["allowed_differences"]:
        err_console.print(
            escape(f"allowed protocol difference (--allow-diff): {d['field']}: {d['values']}"),
            highlight=False,
        )


def _summary_inputs(conditions: dict[str, list[Path]]) -> dict[str, Path]:
    """Each run's summary (summary.json, or a training run's train_summary.json) by label."""
    return {f"{n}:{p}": compare_lib.summary_file(p) for n, ps in conditions.items() for p in ps}


def _finished(out: Path, force: bool) -> bool:
    if force or not is_done(out):
        return False
    say_already_done(out)
    return True


def _refuse(e: ProtocolMismatch) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    for d in e.differences:
        err_console.print(f"  {escape(d.describe())}", highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def stats(
    condition: Conditions,
    metric: Metric,
    out: OutDir,
    alpha: Alpha = 0.05,
    allow_diff: AllowDiff = None,
    force: Force = False,
) -> None:
    """Multi-seed summary per condition: n, mean, std, t-based CI, per-seed values, run ids.

    Runs within a condition must share their protocol (see `compare`); writes stats.json.
    """
    if _finished(out, force):
        return
    conditions = _conditions(condition)
    # Inputs are checked before --out is created: a refused or failed call leaves nothing.
    try:
        result = compare_lib.seed_stats(
            compare_lib.collect(conditions, metric), alpha=alpha, allow_diff=set(allow_diff or [])
        )
    except ProtocolMismatch as e:
        _refuse(e)
    config = {
        "conditions": condition,
        "metric": metric,
        "alpha": alpha,
        "allow_diff": allow_diff or [],
    }
    run = open_run(out, command="stats", config=config, force=force)
    write_json(run.file("stats.json"), {"schema_version": 1, "metric": metric, **result})
    _print(result, metric)
    run.finish(inputs=_summary_inputs(conditions))


def compare(
    condition: Conditions,
    metric: Metric,
    reference: Annotated[
        str, typer.Option(help="Condition the others are compared against.", show_default=False)
    ],
    out: OutDir,
    alpha: Alpha = 0.05,
    allow_diff: AllowDiff = None,
    force: Force = False,
) -> None:
    """Welch tests and Cohen's d against a reference, Bonferroni and Holm corrected.

    Refuses (exit 3, naming each field) when the runs differ in protocol: effective batch,
    world size, optimizer steps, learning rate, judge model or prompt, sampling temperature or
    count, question set, chat template or system prompt. Writes compare.json and compare.md.
    """
    if _finished(out, force):
        return
    conditions = _conditions(condition)
    config = {
        "conditions": condition,
        "metric": metric,
        "reference": reference,
        "alpha": alpha,
        "allow_diff": allow_diff or [],
    }
    # Check before creating --out: a refused comparison leaves nothing behind.
    try:
        points = compare_lib.collect(conditions, metric)
        result = compare_lib.compare(
            points, reference=reference, alpha=alpha, allow_diff=set(allow_diff or [])
        )
    except ProtocolMismatch as e:
        _refuse(e)
    run = open_run(out, command="compare", config=config, force=force)
    table = compare_lib.markdown_table(result, metric)
    write_json(
        run.file("compare.json"),
        {"schema_version": compare_lib.RESULT_VERSION, "metric": metric, **result},
    )
    allowed = "".join(
        f"\n- allowed difference (--allow-diff): {d['field']}: {d['values']}"
        for d in result["allowed_differences"]
    )
    write_bytes_atomic(
        run.file("compare.md"),
        (f"# {metric}\n\n{table}\n{result['cohens_d_convention']}.\n{allowed}\n").encode(),
    )
    _print(result, metric)
    console.print(table, highlight=False)
    console.print(result["cohens_d_convention"], highlight=False)
    run.finish(inputs=_summary_inputs(conditions))


def report(
    runs: Annotated[
        list[Path], typer.Argument(help="stats or compare run directories.", show_default=False)
    ],
    out: OutDir,
    title: Annotated[str, typer.Option(help="Report heading.")] = "persona-cli report",
    allow_diff: AllowDiff = None,
    force: Force = False,
) -> None:
    """Markdown report with PNG figures from stats/compare runs.

    Bar charts of each condition's mean with 95% CI error bars and per-seed dots, pre/post plots
    paired by seed against the reference, and the numbers as tables. Writes report.md and PNGs.
    Refuses (exit 3) when runs of the same command across the inputs differ in protocol beyond
    what each input declared (--allow-diff adds more).
    """
    if _finished(out, force):
        return
    allowed = set(allow_diff or [])
    try:
        # Every input is read and guarded before --out is created.
        report_lib.guard_sources(runs, allowed)
    except ProtocolMismatch as e:
        _refuse(e)
    config = {"runs": [str(r) for r in runs], "title": title, "allow_diff": sorted(allowed)}
    run = open_run(out, command="report", config=config, force=force)
    text, figures = report_lib.build(runs, run.path, title)
    write_bytes_atomic(run.file("report.md"), text.encode())
    console.print(f"report: {run.file('report.md')}", highlight=False)
    for fig in figures:
        console.print(f"figure: {fig}", highlight=False)
    run.finish(inputs={f"{r}": r / report_lib.load_source(r)[0] for r in runs})
