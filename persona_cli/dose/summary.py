"""The dose-response summary and plot, recomputed from every finished cell's samples.

Per arm and dose: the source persona's marker rate pooled over seeds with Wald and Wilson 95%
intervals, each seed's rate, and the mean, std and t-interval across seeds where there are two
or more. Per dose, every pair of arms is compared with seeds as the unit of replication
(`stats.seed_comparison`): with two or more seeds in both arms the headline is Welch's t-test on
the per-seed rates, and the count test on completions pooled over seeds (Fisher or z, chosen by
`--test`) is reported beside it as `pooled`; with one seed per arm the count test is the only
test and the record's `note` says so. Every p-value names its test and alternative; the headline
p-values of all doses form one family with Holm and Bonferroni adjusted values beside the raw
ones. The test settings are written into the summary. The cells still missing are listed. The
plot puts optimizer steps on a symlog axis (dose 0, the coupling adapter alone, sits at 0) with
Wilson interval bars, one line per arm.

    persona-cli dose-sweep summarize runs/dose --test fisher --alternative less

Schema 2 (this release) replaced schema 1's flat count test per arm pair (`arm_tests[i]` held
`two_proportion_test` fields) with `headline`/`pooled`/`note` records and added `test`,
`alternative` and `adjustment`; `settings_of` reads the settings of either.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from persona_cli import stats
from persona_cli.artifacts import write_bytes_atomic
from persona_cli.dose.plan import BASE_ARM, Cell
from persona_cli.eval.score import recompute_summary
from persona_cli.guard import ProtocolMismatch, check_protocols, protocol_of
from persona_cli.schemas import DOSE_SUMMARY

SCHEMA_VERSION = DOSE_SUMMARY.version
SECOND_STAGE = "stage[1]."  # the second-stage adapter of a cell's eval (stage[0]: the coupling)
DOSE_FIELD = f"{SECOND_STAGE}optimizer_steps"
SETTINGS_KEY = "summary"  # where a sweep's config.json records its ComparisonConfig


def cell_counts(cell: Cell) -> tuple[int, int]:
    """(marker hits, completions) of the source persona, from the cell's saved samples."""
    source = recompute_summary(cell.path / "eval")["source"]
    return source["successes"], source["n"]


def settings_from_config(config: dict[str, Any]) -> stats.ComparisonConfig:
    """The test settings a sweep's config.json records; a sweep started before they were
    recorded used the defaults (auto test, two-sided), which is what its summary computed."""
    if SETTINGS_KEY not in config:
        return stats.ComparisonConfig()
    return stats.ComparisonConfig(**config[SETTINGS_KEY])


def settings_of(summary: dict[str, Any]) -> stats.ComparisonConfig | None:
    """The settings a written summary used; None for a schema-1 summary (before seed-level
    tests), which must be recomputed to be read with this release."""
    if summary["schema_version"] == 1:
        return None
    return stats.ComparisonConfig(test=summary["test"], alternative=summary["alternative"])


def guard_cells(cells: list[Cell], allow_diff: Iterable[str] = ()) -> dict[str, Any]:
    """The protocol guard across a sweep's finished cells (their eval runs). The dose is the
    declared manipulation (`stage[1].optimizer_steps`, the second stage's steps); the arms' data
    is not a guarded field. Every cell must agree on everything else: the evaluation, the
    coupling (stage[0]), and among cells with a second stage (dose 0 has none) its settings.
    Raises ProtocolMismatch (exit 3); returns the record the summary keeps."""
    done = [c for c in cells if c.done]
    protocols = {c.name: protocol_of(c.path / "eval") for c in done}
    first = {
        n: {k: v for k, v in p.items() if not k.startswith(SECOND_STAGE)}
        for n, p in protocols.items()
    }
    refused, allowed = check_protocols(first, allow_diff)
    second = {c.name: protocols[c.name] for c in done if c.arm != BASE_ARM}
    more_refused, more_allowed = check_protocols(second, {*allow_diff, DOSE_FIELD})
    refused += [d for d in more_refused if d.field.startswith(SECOND_STAGE)]
    allowed += [
        d for d in more_allowed if d.field.startswith(SECOND_STAGE) and d.field != DOSE_FIELD
    ]
    if refused:
        raise ProtocolMismatch(refused)
    return {
        "dose_field": DOSE_FIELD,
        "allowed_differences": [d.to_dict() for d in allowed],
        "cells_checked": len(done),
    }


def summarize(
    cells: list[Cell],
    arms: list[str],
    config: stats.ComparisonConfig,
    allow_diff: Iterable[str] = (),
) -> dict[str, Any]:
    """The summary of the finished cells, after `guard_cells` found their protocols agree."""
    config.check()
    protocol = guard_cells(cells, allow_diff)
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
                comparison = stats.seed_comparison(
                    list(pa["per_seed"].values()),
                    list(pb["per_seed"].values()),
                    (pa["successes"], pa["n"]),
                    (pb["successes"], pb["n"]),
                    config=config,
                )
                tests.append({"dose": dose, "arm1": a, "arm2": b, **comparison})
    adjustment = stats.adjust_headlines(tests)
    missing = [
        {"cell": c.name, "arm": c.arm, "dose": c.dose, "seed": c.seed} for c in cells if not c.done
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        **config.to_dict(),
        "adjustment": {**adjustment, "family": "every dose and pair of arms"},
        "protocol": protocol,
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
