"""The dose-response summary and plot, recomputed from every finished cell's samples.

Per arm and dose: the source persona's marker rate pooled over seeds with Wald and Wilson 95%
intervals, each seed's rate, and the mean, std and t-interval across seeds where there are two
or more; per dose, every pair of arms compared by a two-proportion z-test and Fisher's exact
test (`stats.two_proportion_test` reports which one its p-value comes from); the cells still
missing. The plot puts optimizer steps on a symlog axis (dose 0, the coupling adapter alone,
sits at 0) with Wilson interval bars, one line per arm.

    persona-cli dose-sweep summarize runs/dose
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

from persona_cli import stats
from persona_cli.artifacts import write_bytes_atomic
from persona_cli.dose.plan import BASE_ARM, Cell
from persona_cli.eval.score import recompute_summary

SCHEMA_VERSION = 1


def cell_counts(cell: Cell) -> tuple[int, int]:
    """(marker hits, completions) of the source persona, from the cell's saved samples."""
    source = recompute_summary(cell.path / "eval")["source"]
    return source["successes"], source["n"]


def summarize(cells: list[Cell], arms: list[str]) -> dict[str, Any]:
    done = [c for c in cells if c.done]
    counts = {c.name: cell_counts(c) for c in done}
    points = []
    for (arm, dose), group in itertools.groupby(
        sorted(done, key=lambda c: (c.arm, c.dose, c.seed)), key=lambda c: (c.arm, c.dose)
    ):
        group = list(group)
        hits = sum(counts[c.name][0] for c in group)
        n = sum(counts[c.name][1] for c in group)
        per_seed = {c.seed: counts[c.name][0] / counts[c.name][1] for c in group}
        points.append(
            {
                "arm": arm,
                "dose": dose,
                "successes": hits,
                "n": n,
                "wilson": stats.proportion_interval(hits, n, method="wilson").to_dict(),
                "wald": stats.proportion_interval(hits, n, method="wald").to_dict(),
                "per_seed": {str(s): r for s, r in sorted(per_seed.items())},
                "seeds": stats.summarize_seeds(per_seed) if len(per_seed) > 1 else None,
            }
        )
    by_key = {(p["arm"], p["dose"]): p for p in points}
    tests = []
    for dose in sorted({p["dose"] for p in points if p["arm"] != BASE_ARM}):
        for a, b in itertools.combinations(arms, 2):
            if (a, dose) in by_key and (b, dose) in by_key:
                pa, pb = by_key[(a, dose)], by_key[(b, dose)]
                test = stats.two_proportion_test(pa["successes"], pa["n"], pb["successes"], pb["n"])
                tests.append({"dose": dose, "arm1": a, "arm2": b, **test.to_dict()})
    missing = [
        {"cell": c.name, "arm": c.arm, "dose": c.dose, "seed": c.seed} for c in cells if not c.done
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "points": points,
        "arm_tests": tests,
        "missing": missing,
        "n_cells": len(cells),
        "n_done": len(done),
    }


def plot(summary: dict[str, Any], arms: list[str], path: Path, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    base = [p for p in summary["points"] if p["arm"] == BASE_ARM]
    for arm, colour in zip(
        arms, itertools.cycle(["#c0392b", "#2471a3", "#229954", "#7d3c98"]), strict=False
    ):
        pts = sorted((p for p in summary["points"] if p["arm"] == arm), key=lambda p: p["dose"])
        pts = base + pts  # every arm starts from the coupling adapter alone
        if not pts:
            continue
        x = [p["dose"] for p in pts]
        y = [p["wilson"]["rate"] for p in pts]
        err = [
            [r - p["wilson"]["low"] for r, p in zip(y, pts, strict=True)],
            [p["wilson"]["high"] - r for r, p in zip(y, pts, strict=True)],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, label=arm)
    ax.set_xscale("symlog", linthresh=1)
    doses = sorted({p["dose"] for p in summary["points"]})
    ax.set_xticks(doses, [str(d) for d in doses])  # label the doses run, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("second-stage optimizer steps (symlog)")
    ax.set_ylabel(f"marker rate, persona {source}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("marker survival vs dose (Wilson 95% intervals)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
