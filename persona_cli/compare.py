"""Multi-seed statistics per condition and pairwise comparisons, behind the protocol guard.

A condition is a named set of finished run directories, one per seed. `collect` reads one metric
(a dotted path into each run's summary.json, or train_summary.json for a training run, which has
no summary.json) and the seed from each manifest; `seed_stats` summarises each condition (n,
mean, std, t-based 95% CI half-width, per-seed values, run ids); `compare` tests every condition
against a reference with seeds as the unit of replication (`stats.seed_comparison`): the
headline is Welch's test on the per-seed values (two-sided) where both have two or more seeds.
When the metric is a proportion (its parent node holds integer `successes` and `n`, as
eval-markers' `source.rate` does) a count test on completions pooled over seeds is reported
beside it, labelled `pooled`; with one seed per condition that count test is the headline and
the row's `note` says so. `p_holm` and `p_bonferroni` adjust the headline p-values over every
comparison (`adjustment` names the family); Cohen's d comes with them. All of it runs after
`guard.check_protocols` found no undeclared difference.

    persona-cli compare --condition base='runs/base_s*' --condition em='runs/em_s*' \\
        --metric source.rate --reference base --out runs/compare_em
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import stats
from persona_cli.artifacts import read_json
from persona_cli.errors import InputError, UserError
from persona_cli.guard import (
    guard_protocols,
    lineage_seed,
    metric_value,
    protocol_of,
)
from persona_cli.rundir import MANIFEST, is_done
from persona_cli.schemas import COMPARE_RESULT_KIND

# compare.json's schema. 2: each comparison has `headline`, `pooled`, `note` and always
# `p_holm`/`p_bonferroni`, and the result records `test`, `alternative` and `adjustment`;
# 1 had a bare `welch` record per comparison. `upgrade` reads either.
RESULT_VERSION = COMPARE_RESULT_KIND.version
log = logging.getLogger(__name__)
SUMMARY = "summary.json"
TRAIN_SUMMARY = "train_summary.json"  # a training run's summary (persona_cli.train.lifecycle)
COMPARISON = stats.ComparisonConfig()  # Welch two-sided; the count test by the auto rule
D_CONVENTION = (
    "Cohen's d = (mean(condition) - mean(reference)) / pooled SD (ddof=1); positive means the "
    "condition's metric is higher than the reference's"
)


@dataclass(frozen=True)
class RunPoint:
    run: str
    run_id: str
    seed: int
    value: float
    protocol: dict[str, Any]
    summary: str  # the summary file the value was read from
    counts: tuple[int, int] | None  # (successes, n) when the metric is a proportion, else None


def summary_file(run: Path) -> Path:
    """summary.json, or train_summary.json for a training run (which writes no summary.json)."""
    for name in (SUMMARY, TRAIN_SUMMARY):
        if (run / name).is_file():
            return run / name
    raise InputError(run, f"holds neither {SUMMARY} nor {TRAIN_SUMMARY}")


def proportion_counts(summary: dict[str, Any], metric: str, value: float) -> tuple[int, int] | None:
    """(successes, n) when `metric` is a rate: its parent node holds integer `successes` and
    `n` (n > 0) whose ratio is the metric's value, as in eval-markers' `source.rate`."""
    node: Any = summary
    for part in metric.split(".")[:-1]:
        node = node[part]
    k, n = node.get("successes"), node.get("n")  # a node without counts is not a proportion
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (k, n)) or n <= 0:
        return None
    return (k, n) if k / n == value else None


def collect(conditions: dict[str, list[Path]], metric: str) -> dict[str, list[RunPoint]]:
    out: dict[str, list[RunPoint]] = {}
    for name, runs in conditions.items():
        if not runs:
            raise UserError(f"--condition {name}: matched no run directories")
        points = []
        seen: dict[int, str] = {}
        for run in runs:
            if not is_done(run):
                raise InputError(run, "not a finished run directory (no DONE)")
            manifest = read_json(run / MANIFEST)
            seed = lineage_seed(run)
            if seed is None:
                raise InputError(
                    run / MANIFEST, "records no seed, nor does any run it derives from"
                )
            if seed in seen:
                raise UserError(f"--condition {name}: {run} and {seen[seed]} share seed {seed}")
            seen[seed] = str(run)
            path = summary_file(run)
            summary = read_json(path)
            value = metric_value(summary, metric, path)
            points.append(
                RunPoint(
                    str(run),
                    manifest["run_id"],
                    seed,
                    value,
                    protocol_of(run),
                    str(path),
                    proportion_counts(summary, metric, value),
                )
            )
        out[name] = sorted(points, key=lambda p: p.seed)
    return out


def _guard(points: dict[str, list[RunPoint]], allow_diff: set[str]) -> list[dict[str, Any]]:
    protocols = {p.run: p.protocol for ps in points.values() for p in ps}
    return [d.to_dict() for d in guard_protocols(protocols, allow_diff)]


def seed_stats(
    points: dict[str, list[RunPoint]], *, alpha: float = 0.05, allow_diff: set[str] | None = None
) -> dict[str, Any]:
    allowed = _guard(points, allow_diff or set())
    conditions = {}
    for name, ps in points.items():
        summary = stats.summarize_seeds({p.seed: p.value for p in ps}, alpha=alpha)
        conditions[name] = {
            **summary,
            "runs": [p.run for p in ps],
            "run_ids": [p.run_id for p in ps],
        }
    return {"conditions": conditions, "allowed_differences": allowed, "alpha": alpha}


def compare(
    points: dict[str, list[RunPoint]],
    *,
    reference: str,
    alpha: float = 0.05,
    allow_diff: set[str] | None = None,
) -> dict[str, Any]:
    if reference not in points:
        raise UserError(
            f"--reference {reference!r}: not one of the conditions ({', '.join(points)})"
        )
    result = seed_stats(points, alpha=alpha, allow_diff=allow_diff)
    ref = [p.value for p in points[reference]]
    rows = []
    for name, ps in points.items():
        if name == reference:
            continue
        values = [p.value for p in ps]
        both = len(values) > 1 and len(ref) > 1
        rows.append(
            {
                "condition": name,
                "reference": reference,
                "delta": sum(values) / len(values) - sum(ref) / len(ref),
                **stats.seed_comparison(
                    values,
                    ref,
                    _pooled_counts(ps),
                    _pooled_counts(points[reference]),
                    config=COMPARISON,
                ),
                "cohens_d": stats.cohens_d(values, ref) if both else None,
            }
        )
    result.update(
        {
            "schema_version": RESULT_VERSION,
            "reference": reference,
            **COMPARISON.to_dict(),
            "adjustment": _adjust(rows),
            "comparisons": rows,
            "cohens_d_convention": D_CONVENTION,
        }
    )
    return result


def upgrade(result: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """A compare.json of any release in this release's shape: the one place its schema drift
    is handled. Schema 1 rows had only the Welch test (two-sided, across seeds) under `welch`;
    its Holm and Bonferroni values, over the defined Welch p-values, are recomputed the same
    way."""
    version = result["schema_version"]
    if version == RESULT_VERSION:
        return result
    if version != 1:
        raise InputError(source, f"compare schema_version {version!r} is not 1 or {RESULT_VERSION}")
    log.info(
        "%s: compare schema 1 read as %d (its Welch test as the headline)", source, RESULT_VERSION
    )
    rows = []
    for old in result["comparisons"]:
        row = {k: v for k, v in old.items() if k not in ("welch", "p_holm", "p_bonferroni")}
        welch = old["welch"]
        row["headline"] = None if welch is None else stats.TestResult(**welch).labelled()
        if welch is not None:
            row["headline"]["unit"] = "seed"
        row["pooled"] = None
        row["note"] = None if welch is not None else "fewer than two seeds in an arm: no test"
        rows.append(row)
    return {
        **result,
        "schema_version": RESULT_VERSION,
        **COMPARISON.to_dict(),
        "adjustment": _adjust(rows),
        "comparisons": rows,
    }


def _adjust(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {**stats.adjust_headlines(rows), "family": "every condition against the reference"}


def _pooled_counts(points: list[RunPoint]) -> tuple[int, int] | None:
    if any(p.counts is None for p in points):
        return None
    return sum(p.counts[0] for p in points), sum(p.counts[1] for p in points)


def markdown_table(result: dict[str, Any], metric: str) -> str:
    """The research log's table: condition | metric +/- half-width | delta vs reference, then
    the headline test of each comparison named with its test and alternative, the Holm-adjusted
    p-value, the pooled count test where there is one, and each comparison's note."""
    ref = result.get("reference")  # None for a stats run: no comparisons
    by_name = {r["condition"]: r for r in result.get("comparisons", [])}
    lines = [
        f"| condition | {metric} (mean ± 95% CI half-width) | n seeds | Δ vs {ref or '-'} "
        "| p (test, alternative) | p Holm | pooled p (test, alternative) | Cohen's d |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, c in result["conditions"].items():
        hw = f" ± {c['half_width']:.4f}" if c["half_width"] is not None else ""
        row = by_name.get(name)
        if row is None:
            delta = "(reference)" if name == ref else "-"
            p = holm = pooled = d = "-"
        else:
            delta = f"{row['delta']:+.4f}"
            p, pooled = _p_cell(row["headline"]), _p_cell(row["pooled"])
            holm = stats.format_p(row["p_holm"])
            d = f"{row['cohens_d']:+.2f}" if row["cohens_d"] is not None else "-"
            if row["note"]:
                notes.append(f"- {name} vs {ref}: {row['note']}")
        lines.append(
            f"| {name} | {c['mean']:.4f}{hw} | {c['n_seeds']} | {delta} | {p} | {holm} "
            f"| {pooled} | {d} |"
        )
    if by_name:
        notes.insert(
            0,
            "\nSeeds are the unit of replication: p is Welch's test on per-seed values where both "
            "sides have two or more seeds; a pooled count test treats completions as independent."
            " Holm adjusts the headline p-values over every comparison.\n",
        )
    return "\n".join(lines + notes) + "\n"


def _p_cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    return f"{stats.format_p(record['p_value'])} ({stats.describe_test(record)})"
