"""Multi-seed statistics per condition and pairwise comparisons, behind the protocol guard.

A condition is a named set of finished run directories, one per seed. `collect` reads one metric
(a dotted path into each run's summary.json) and the seed from each manifest; `seed_stats`
summarises each condition (n, mean, std, t-based 95% CI half-width, per-seed values, run ids);
`compare` adds Welch tests and Cohen's d of every condition against a reference, with
Bonferroni and Holm corrections, after `protocol.check_protocols` found no undeclared difference.

    persona-cli compare --condition base='runs/base_s*' --condition em='runs/em_s*' \\
        --metric source.rate --reference base --out runs/compare_em
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import stats
from persona_cli.artifacts import read_json
from persona_cli.errors import InputError, UserError
from persona_cli.protocol import (
    ProtocolMismatch,
    check_protocols,
    lineage_seed,
    metric_value,
    protocol_of,
)
from persona_cli.rundir import MANIFEST, is_done

SUMMARY = "summary.json"
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
            value = metric_value(read_json(run / SUMMARY), metric, run / SUMMARY)
            points.append(RunPoint(str(run), manifest["run_id"], seed, value, protocol_of(run)))
        out[name] = sorted(points, key=lambda p: p.seed)
    return out


def _guard(points: dict[str, list[RunPoint]], allow_diff: set[str]) -> list[dict[str, Any]]:
    protocols = {p.run: p.protocol for ps in points.values() for p in ps}
    refused, allowed = check_protocols(protocols, allow_diff)
    if refused:
        raise ProtocolMismatch(refused)
    return [{"field": d.field, "values": d.values} for d in allowed]


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
        welch = stats.welch_test(values, ref) if len(values) > 1 and len(ref) > 1 else None
        rows.append(
            {
                "condition": name,
                "reference": reference,
                "delta": sum(values) / len(values) - sum(ref) / len(ref),
                "welch": welch.to_dict() if welch else None,
                "cohens_d": stats.cohens_d(values, ref)
                if len(values) > 1 and len(ref) > 1
                else None,
            }
        )
    testable = [r for r in rows if r["welch"] and r["welch"]["p_value"] is not None]
    for method in ("bonferroni", "holm"):
        adjusted = stats.adjust_pvalues([r["welch"]["p_value"] for r in testable], method)
        for r, p in zip(testable, adjusted, strict=True):
            r[f"p_{method}"] = p
    result.update(
        {"reference": reference, "comparisons": rows, "cohens_d_convention": D_CONVENTION}
    )
    return result


def markdown_table(result: dict[str, Any], metric: str) -> str:
    """The research log's table: condition | metric +/- half-width | delta vs reference."""
    ref = result.get("reference")
    by_name = {r["condition"]: r for r in result.get("comparisons", [])}
    lines = [
        f"| condition | {metric} (mean ± 95% CI half-width) | n seeds | Δ vs {ref or '-'} "
        "| p (Welch, Holm) | Cohen's d |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["conditions"].items():
        hw = f" ± {c['half_width']:.4f}" if c["half_width"] is not None else ""
        row = by_name.get(name)
        if row is None:
            delta, p, d = ("(reference)" if name == ref else "-"), "-", "-"
        else:
            delta = f"{row['delta']:+.4f}"
            p = f"{row['p_holm']:.3g}" if row.get("p_holm") is not None else "-"
            d = f"{row['cohens_d']:+.2f}" if row["cohens_d"] is not None else "-"
        lines.append(f"| {name} | {c['mean']:.4f}{hw} | {c['n_seeds']} | {delta} | {p} | {d} |")
    return "\n".join(lines) + "\n"
