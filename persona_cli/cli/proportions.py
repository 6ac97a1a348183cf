"""`persona-cli proportions`: two-proportion tests on counts, to check a published table.

    persona-cli proportions --csv data/stats/research_log_dose_table.csv --test fisher \\
        --alternative less
    persona-cli proportions --row "dose 10:166/280:113/280" --alternative greater --out runs/p

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from persona_cli import proportions as lib
from persona_cli.cli.console import console
from persona_cli.cli.options import configured, say_already_done


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def print_table(result: dict[str, Any]) -> None:
    # Compact (no rules between columns): the ten columns fit an 80-column log.
    t = Table(
        title=f"two-proportion tests (--test {result['test']})",
        box=box.SIMPLE_HEAD,
        padding=0,
        show_edge=False,
        pad_edge=False,
    )
    cols = ("label", "k1/n1", "rate1", "k2/n2", "rate2", "diff", "test", "alternative", "p")
    for col in (*cols, "p adj."):
        t.add_column(col, justify="left" if col == "label" else "right")
    for r in result["rows"]:
        t.add_row(
            r["label"],
            f"{r['successes1']}/{r['n1']}",
            _pct(r["rate1"]),
            f"{r['successes2']}/{r['n2']}",
            _pct(r["rate2"]),
            f"{r['diff']:+.1%}",
            r["test"],
            r["alternative"],
            _p(r["p_value"]),
            _p(r["p_adjusted"]),
        )
    adjustment = result["adjustment"]
    t.caption = (
        f"p adj.: {adjustment['method']} over {adjustment['m']} row(s); 'less' means rate1 < "
        "rate2; counts as given (completions treated as independent)"
    )
    console.print(t)


@configured(
    lib.ProportionsConfig,
    flags={"rows": "--row", "csv": "--csv"},
    repeat={"rows"},
    out_optional=True,
)
def proportions(cfg: lib.ProportionsConfig, out: Path | None, force: bool) -> None:
    """Test k1/n1 against k2/n2 for every row: Fisher or z, named with its alternative.

    With --out, also a run directory with proportions.json.
    """
    outcome = lib.run_proportions(cfg, out, force=force)
    if outcome.result is None:
        say_already_done(out)
        return
    print_table(outcome.result)
    if out is not None:
        console.print(f"result: {out / lib.RESULT}", highlight=False)
