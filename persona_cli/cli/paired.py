"""`persona-cli compare-items`: paired item-level comparison of eval-capability runs.

persona-cli compare-items runs/cap_base runs/cap_em --out runs/cmp --plot
persona-cli compare-items 'runs/cap_base_s*' 'runs/cap_em_s*' --out runs/cmp_seeds
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from persona_cli import paired
from persona_cli.artifacts import write_bytes_atomic, write_json
from persona_cli.cli.console import console
from persona_cli.cli.options import AllowDiff, Alpha, Force, report_done
from persona_cli.errors import UserError
from persona_cli.rundir import open_run

Side = Annotated[
    str,
    typer.Argument(
        help="A run directory or a GLOB of them (quote it): one eval-capability run per seed.",
        show_default=False,
    ),
]


def _runs(side: str, pattern: str) -> list[Path]:
    runs = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
    if not runs:
        raise UserError(f"compare-items side {side} {pattern!r}: matched no run directories")
    return runs


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _table(result: dict[str, Any], grouping: str) -> Table:
    """Per group: accuracy A -> B and delta in pp with its bootstrap interval (one pair), or
    the mean delta, t-interval and sign agreement across pairs (several)."""
    across = result["across_pairs"]
    t = Table(title=f"B - A by {grouping} (pp), pairs by {result['pairing']}")
    cols = ["group", "n", "acc A", "acc B", "delta", "95% CI", "broken", "fixed", "McNemar p"]
    if across is not None:
        cols = ["group", "n", "mean delta", "95% t-CI", "seeds agreeing", "per pair"]
    for col in cols:
        t.add_column(col, justify="left" if col == "group" else "right")
    first = result["pairs"][0]
    rows = {"overall": first["overall"], **first["groups"][grouping]}
    for name, g in rows.items():
        if across is None:
            t.add_row(
                name,
                str(g["n"]),
                f"{g['accuracy_a']['rate']:.3f}",
                f"{g['accuracy_b']['rate']:.3f}",
                _pct(g["delta"]),
                f"[{_pct(g['delta_low'])}, {_pct(g['delta_high'])}]",
                str(g["broken"]),
                str(g["fixed"]),
                f"{g['mcnemar_exact_p']:.3g}",
            )
            continue
        s = across["delta"] if name == "overall" else across["groups"][grouping].get(name)
        if s is None:
            continue
        t.add_row(
            name,
            str(g["n"]),
            _pct(s["mean"]),
            f"[{_pct(s['low'])}, {_pct(s['high'])}]",
            f"{s['n_agree_with_mean']}/{s['n_seeds']}",
            ", ".join(_pct(v) for v in s["values"]),
        )
    return t


def compare_items(
    a: Side,
    b: Side,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory for compare_items.json (and the PNG).", show_default=False
        ),
    ] = None,
    grouping: Annotated[
        str, typer.Option(help="Table and plot grouping: subject, class or subject_class.")
    ] = "subject_class",
    plot: Annotated[bool, typer.Option(help="Also write compare_items.png (needs --out).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the paired bootstrap (pair i: seed + i).")] = 0,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of the items.")] = 2000,
    alpha: Alpha = 0.05,
    allow_diff: AllowDiff = None,
    force: Force = False,
) -> None:
    """Paired per-item comparison of eval-capability runs A and B on the same items.

    Flips (correct->wrong "broken", wrong->correct "fixed"), the share of A's correct items
    broken in B, the exact McNemar test, and per-subject / per-gold-class accuracy deltas with
    paired bootstrap intervals. A GLOB matching several runs per side (one per seed) pairs them
    by seed (else by order) and summarises each delta across seeds: mean, t-interval, seeds
    agreeing in sign. Refuses (exit 3) when the runs differ in item set, scorer, chat template
    or system prompt (or, within a side, in any guarded field of their training runs).
    """
    if grouping not in ("subject", "class", "subject_class"):
        raise UserError(f"--grouping {grouping!r}: choose subject, class or subject_class")
    if plot and out is None:
        raise UserError("--plot writes into the run directory: give --out")
    a_runs, b_runs = _runs("A", a), _runs("B", b)
    result = paired.compare_items(
        a_runs, b_runs, allow_diff=allow_diff or [], seed=seed, n_boot=n_boot, alpha=alpha
    )
    if not result["pairs"][0]["groups"][grouping]:
        grouping = "class"  # items without subjects (ARC)
    console.print(_table(result, grouping))
    overall = result["pairs"][0]["overall"]
    share = overall["broken_share"]
    console.print(
        f"broken share (A's correct items wrong in B): "
        f"{'-' if share is None else f'{share:.1%}'}; McNemar exact p "
        f"{overall['mcnemar_exact_p']:.3g} (first pair)"
    )
    for d in result["allowed_differences"]:
        console.print(f"allowed difference (--allow-diff): {d['field']}: {d['values']}")
    if out is None:
        return
    config = {
        "a": a,
        "b": b,
        "grouping": grouping,
        "seed": seed,
        "n_boot": n_boot,
        "alpha": alpha,
        "allow_diff": allow_diff or [],
    }
    run = open_run(out, command="compare-items", config=config, force=force)
    if report_done(run):
        return
    write_json(run.file(paired.RESULT), result)
    if plot:
        write_bytes_atomic(run.file(paired.PLOT), paired.plot_png(result, grouping))
    inputs = {
        f"{side}:{r}": r / paired.ROWS for side, rs in (("A", a_runs), ("B", b_runs)) for r in rs
    }
    run.finish(inputs=inputs)
