"""`persona-cli compare-items`: paired item-level comparison of two sides of runs of one kind.

persona-cli compare-items runs/cap_base runs/cap_em --out runs/cmp --plot
persona-cli compare-items 'runs/cap_base_s*' 'runs/cap_em_s*' --out runs/cmp_seeds
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from persona_cli.cli.console import console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.paired_config import CompareItemsConfig


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def _table(result: dict[str, Any], grouping: str) -> Table:
    """Per group: rate A -> B and delta in pp with its bootstrap interval (one pair), or the
    mean delta, t-interval and sign agreement across pairs (several)."""
    across = result["across_pairs"]
    words = result["labels"]
    t = Table(
        title=f"{result['kind']}: B - A by {grouping} (pp), pairs by {result['pairing']}; "
        f"outcome: {result['outcome']}"
    )
    cols = ["group", "n", "rate A", "rate B", "delta", "95% CI", words["a_only"]]
    cols += [words["b_only"], "McNemar p"]
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
                f"{g['rate_a']['rate']:.3f}",
                f"{g['rate_b']['rate']:.3f}",
                _pct(g["delta"]),
                f"[{_pct(g['delta_low'])}, {_pct(g['delta_high'])}]",
                str(g["a_only"]),
                str(g["b_only"]),
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


@configured(CompareItemsConfig, arguments={"a", "b"}, out_optional=True)
def compare_items(cfg: CompareItemsConfig, out: Path | None, force: bool) -> None:
    """Paired per-item comparison of runs A and B of one kind on the same items.

    eval-capability (correct), eval-markers (marker present, on the same persona x question x
    sample grid) or judge-align (EM, on the same answers). Flips (A yes / B no, A no / B yes),
    the share of A's yes items that are no in B ("broken" for capability), the exact McNemar
    test, and per-group rate deltas with paired (cluster) bootstrap intervals. A GLOB matching
    several runs per side (one per seed) pairs them by seed (else by order) and summarises each
    delta across seeds: mean, t-interval, seeds agreeing in sign. Refuses (exit 3) when the runs'
    guarded fields differ (item set, scorer, sampling, marker, judge, chat template, system
    prompt; within a side also their training runs').
    """
    from persona_cli.paired import run_compare_items

    outcome = run_compare_items(cfg, out, force=force)
    if outcome.result is None:
        say_already_done(out)
        return
    result = outcome.result
    console.print(_table(result, result["grouping"]))
    overall = result["pairs"][0]["overall"]
    share, words = overall["a_only_share"], result["labels"]
    console.print(
        f"{words['a_only']} share (A's {words['yes']} items {words['no']} in B): "
        f"{'-' if share is None else f'{share:.1%}'} ({overall['a_only']}/"
        f"{overall['both'] + overall['a_only']}); McNemar exact p "
        f"{overall['mcnemar_exact_p']:.3g}" + (" (first pair)" if len(result["pairs"]) > 1 else "")
    )
    undefined = sum(p["n_undefined"] for p in result["pairs"])
    if undefined:
        console.print(f"left out: {undefined} item(s) without an outcome on both sides")
    for d in result["allowed_differences"]:
        console.print(f"allowed difference (--allow-diff): {d['field']}: {d['values']}")
