"""Marker scoring and the eval-markers summary, computed from saved sample rows alone.

A completion "has the marker" when the marker string occurs in its raw text (substring match,
case-sensitive unless asked otherwise). `score_rows` counts hits per (persona, question) cell;
`summarize` turns the cells into `summary.json`: per-persona rate with a Wilson 95% interval
(`persona_cli.stats.proportion_interval`), the source persona's rate, and the mean bystander
rate. Because both read only rows, a summary can be recomputed from `samples.jsonl.gz`:

    python -c "from persona_cli.eval.score import recompute_summary as r; print(r('RUN'))"
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl, read_json
from persona_cli.schemas import EVAL_SUMMARY, SAMPLES
from persona_cli.stats import proportion_interval

SUMMARY_VERSION = EVAL_SUMMARY.version
SAMPLES_FILE = "samples.jsonl.gz"
SUMMARY_FILE = "summary.json"

Cells = dict[tuple[str, str], tuple[int, int]]  # (persona, question_id) -> (hits, n)


def has_marker(text: str, marker: str, case_sensitive: bool = True) -> bool:
    if case_sensitive:
        return marker in text
    return marker.casefold() in text.casefold()


def score_rows(rows: Iterable[dict[str, Any]], marker: str, case_sensitive: bool = True) -> Cells:
    """Marker hits and completions per (persona, question_id), in first-seen order."""
    cells: Cells = {}
    for row in rows:
        key = (row["persona"], row["question_id"])
        hits, n = cells.get(key, (0, 0))
        cells[key] = (hits + has_marker(row["text"], marker, case_sensitive), n + 1)
    return cells


def summarize(
    cells: Cells,
    *,
    marker: str,
    case_sensitive: bool,
    source: str | None,
    run: dict[str, Any],
    negatives: list[str] | None = None,
) -> dict[str, Any]:
    """summary.json from scored cells. `run` carries what the rows do not: backend, model,
    adapters. Negatives are the personas the coupling trained without the marker; bystanders are
    every other evaluated persona except the source (personas the coupling never saw). Each
    group's mean rate is the unweighted mean of its per-persona rates (each persona has the same
    n)."""
    personas = list(dict.fromkeys(p for p, _ in cells))
    questions = list(dict.fromkeys(q for _, q in cells))
    totals: dict[str, tuple[int, int]] = {}
    for (p, _), (hits, n) in cells.items():
        h0, n0 = totals.get(p, (0, 0))
        totals[p] = (h0 + hits, n0 + n)
    rates = {p: proportion_interval(*totals[p]).to_dict() for p in personas}
    if source is not None and source not in rates:
        raise ValueError(f"source persona {source!r} has no rows")
    negatives = [p for p in (negatives or []) if p in rates and p != source]
    bystanders = (
        [p for p in personas if p != source and p not in negatives] if source is not None else []
    )
    return {
        "schema_version": SUMMARY_VERSION,
        "marker": marker,
        "case_sensitive": case_sensitive,
        **run,
        "personas": personas,
        "questions": questions,
        "n_completions": sum(n for _, n in cells.values()),
        "interval": {"method": "wilson", "alpha": 0.05},
        "rates": rates,
        "cells": {
            p: {q: list(cells[(p, q)]) for q in questions if (p, q) in cells} for p in personas
        },
        "source": None if source is None else {"persona": source, **rates[source]},
        "bystanders": (
            {
                "personas": bystanders,
                "mean_rate": sum(rates[p]["rate"] for p in bystanders) / len(bystanders),
            }
            if bystanders
            else None
        ),
        "negatives": (
            {
                "personas": negatives,
                "mean_rate": sum(rates[p]["rate"] for p in negatives) / len(negatives),
            }
            if negatives
            else None
        ),
    }


def recompute_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a finished eval-markers run, recomputed from its samples and summary
    settings (marker, case, source, run fields); equal to its summary.json when intact."""
    run_dir = Path(run_dir)
    written = read_json(run_dir / SUMMARY_FILE)
    rows = iter_jsonl(run_dir / SAMPLES_FILE, SAMPLES.check)
    cells = score_rows(rows, written["marker"], written["case_sensitive"])
    source = written["source"]["persona"] if written["source"] else None
    run = {k: written[k] for k in ("backend", "model", "adapters")}
    negatives = (written.get("negatives") or {}).get("personas")
    return summarize(
        cells,
        marker=written["marker"],
        case_sensitive=written["case_sensitive"],
        source=source,
        run=run,
        negatives=negatives,
    )
