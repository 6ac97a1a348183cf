"""Paired comparison of runs scored on the same items: flips, McNemar, per-group deltas, seeds.

Two sides, A (e.g. the base model) and B (e.g. a fine-tune), each one or more finished
eval-capability runs over the same items. Per pair of runs, every item is an (A correct, B
correct) pair: the flip table (both right, broken = A right / B wrong, fixed = A wrong / B
right, both wrong), the share of A's correct items broken in B, the exact McNemar test on the
discordant counts, and accuracy deltas (B - A) overall and per group (subject, gold class,
subject:class) with paired bootstrap intervals that resample items (one seeded numpy Generator
per pair, its seed written down). With several runs per side (one per seed of a fine-tune) the
pairs are matched by `guard.lineage_seed` when every run has a distinct one on both sides, else
by order; each delta is then summarised across pairs (mean, t-interval via
`stats.summarize_seeds`) with how many pairs agree in sign.

The guard (`guard.guard_protocols`, each run's protocol read once): runs within a side must agree
on every guarded field, their adapters' training runs included; across the sides only the runs'
own fields are compared (item set, scorer, chat template, system prompt: the adapter stack behind
B is the manipulation). A refused difference raises `ProtocolMismatch` (exit 3).

The comparison works on `Outcomes` (per-item booleans with their groups), so a reader for other
paired runs (eval-markers samples, judge-align answers) plugs in beside `capability_outcomes`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.errors import InputError, UserError
from persona_cli.guard import guard_protocols, lineage_seed, protocol_of
from persona_cli.rundir import is_done
from persona_cli.schemas import MANIFEST

SCHEMA_VERSION = 1
RESULT = "compare_items.json"
PLOT = "compare_items.png"
ROWS = "capability.jsonl.gz"


@dataclass(frozen=True)
class Outcomes:
    """One run's per-item binary outcome, keyed by item id, with each item's group per
    grouping (None: the item is in no group of that grouping)."""

    run: str
    keys: tuple[str, ...]
    correct: np.ndarray
    groups: dict[str, tuple[str | None, ...]]


def capability_outcomes(run: Path) -> Outcomes:
    """The items of a finished eval-capability run: groupings subject, class (gold label) and
    subject_class (`SUBJECT:LABEL`)."""
    if not is_done(run):
        raise InputError(run, "not a finished run directory (no DONE)")
    command = read_json(run / MANIFEST)["command"]
    if command != "eval-capability":
        raise InputError(run / MANIFEST, f"a {command} run; compare-items reads eval-capability")
    rows = read_jsonl(run / ROWS)
    if rows and "subject" not in rows[0]:
        raise InputError(run / ROWS, "rows without 'subject' (an older eval-capability); rerun")
    subjects = tuple(r["subject"] for r in rows)
    return Outcomes(
        run=str(run),
        keys=tuple(r["id"] for r in rows),
        correct=np.array([bool(r["correct"]) for r in rows]),
        groups={
            "subject": subjects,
            "class": tuple(r["answer"] for r in rows),
            "subject_class": tuple(
                None if s is None else f"{s}:{r['answer']}"
                for s, r in zip(subjects, rows, strict=True)
            ),
        },
    )


def flips(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The 2x2 table of paired outcomes, the broken/fixed shares and the exact McNemar p."""
    from statsmodels.stats.contingency_tables import mcnemar

    both = int(np.sum(a & b))
    broken = int(np.sum(a & ~b))
    fixed = int(np.sum(~a & b))
    neither = int(np.sum(~a & ~b))
    p = float(mcnemar([[both, broken], [fixed, neither]], exact=True).pvalue)
    return {
        "both_correct": both,
        "broken": broken,
        "fixed": fixed,
        "both_wrong": neither,
        "broken_share": broken / (both + broken) if both + broken else None,
        "fixed_share": fixed / (fixed + neither) if fixed + neither else None,
        "mcnemar_exact_p": p,
    }


def paired_delta(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int, alpha: float
) -> dict[str, Any]:
    """Accuracy of each side (Wilson) and delta B - A with a percentile bootstrap interval
    that resamples items, keeping each item's pair together."""
    from persona_cli.stats import proportion_interval

    n = int(a.size)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "n": n,
        "accuracy_a": proportion_interval(int(a.sum()), n, alpha=alpha).to_dict(),
        "accuracy_b": proportion_interval(int(b.sum()), n, alpha=alpha).to_dict(),
        "delta": float(b.mean() - a.mean()),
        "delta_low": float(low),
        "delta_high": float(high),
    }


def compare_pair(
    a: Outcomes, b: Outcomes, *, seed: int, n_boot: int = 2000, alpha: float = 0.05
) -> dict[str, Any]:
    """Flips and deltas of one pair of runs, overall and per group of every grouping."""
    if a.keys != b.keys:
        raise InputError(b.run, f"its items are not those of {a.run} (ids differ)")
    rng = np.random.default_rng(seed)
    groups: dict[str, dict[str, Any]] = {}
    for name, labels in a.groups.items():
        per: dict[str, Any] = {}
        for group in sorted({g for g in labels if g is not None}):
            mask = np.array([g == group for g in labels])
            ga, gb = a.correct[mask], b.correct[mask]
            per[group] = paired_delta(ga, gb, rng, n_boot, alpha) | flips(ga, gb)
        groups[name] = per
    overall = paired_delta(a.correct, b.correct, rng, n_boot, alpha) | flips(a.correct, b.correct)
    return {"a": a.run, "b": b.run, "bootstrap_seed": seed, "overall": overall, "groups": groups}


def _sign_agreement(values: Sequence[float], mean: float) -> dict[str, Any]:
    sign = np.sign(mean)
    return {
        "n_positive": int(sum(v > 0 for v in values)),
        "n_negative": int(sum(v < 0 for v in values)),
        "n_agree_with_mean": int(sum(np.sign(v) == sign for v in values)) if sign else 0,
    }


def across_pairs(pairs: list[dict[str, Any]], labels: list[int]) -> dict[str, Any]:
    """Each delta (and the broken share) summarised over pairs: `summarize_seeds` (mean,
    t-interval) keyed by the pair label (its seed, or its position), plus sign agreement.
    Groups missing from any pair are left out."""
    from persona_cli.stats import summarize_seeds

    def summary(values: list[float | None]) -> dict[str, Any] | None:
        if any(v is None for v in values):
            return None
        by_label = dict(zip(labels, values, strict=True))
        s = summarize_seeds(by_label)  # type: ignore[arg-type]
        return s | _sign_agreement(s["values"], s["mean"])

    out: dict[str, Any] = {
        "delta": summary([p["overall"]["delta"] for p in pairs]),
        "broken_share": summary([p["overall"]["broken_share"] for p in pairs]),
        "groups": {},
    }
    for name in pairs[0]["groups"]:
        shared = set.intersection(*(set(p["groups"][name]) for p in pairs))
        out["groups"][name] = {
            g: summary([p["groups"][name][g]["delta"] for p in pairs]) for g in sorted(shared)
        }
    return out


def pair_runs(a_runs: list[Path], b_runs: list[Path]) -> tuple[str, list[tuple[int, Path, Path]]]:
    """(pairing, [(label, A run, B run)]): by lineage seed when every run has one, distinct
    within its side, and both sides hold the same seeds; else by order (label = position)."""
    if not a_runs or not b_runs:
        raise UserError("compare-items: side A and side B each need at least one run")
    if len(a_runs) != len(b_runs):
        raise UserError(f"compare-items: {len(a_runs)} run(s) on side A, {len(b_runs)} on side B")
    seeds_a = [lineage_seed(r) for r in a_runs]
    seeds_b = [lineage_seed(r) for r in b_runs]
    by_seed = (
        None not in seeds_a + seeds_b
        and len(set(seeds_a)) == len(a_runs)
        and set(seeds_a) == set(seeds_b)
        and len(a_runs) > 1
    )
    if by_seed:
        a_of = dict(zip(seeds_a, a_runs, strict=True))
        b_of = dict(zip(seeds_b, b_runs, strict=True))
        return "seed", [(s, a_of[s], b_of[s]) for s in sorted(a_of)]  # type: ignore[type-var]
    return "order", [(i, a, b) for i, (a, b) in enumerate(zip(a_runs, b_runs, strict=True))]


def guard(a_runs: list[Path], b_runs: list[Path], allow_diff: Iterable[str]) -> list[Any]:
    """Within a side: every guarded field, stages included. Across sides: the runs' own fields.
    Returns the declared (--allow-diff) differences; raises ProtocolMismatch on others."""
    allow = set(allow_diff)
    sides = {"A": {f"A:{r}": protocol_of(r) for r in a_runs}}
    sides["B"] = {f"B:{r}": protocol_of(r) for r in b_runs}
    allowed = []
    for protocols in sides.values():
        allowed += guard_protocols(protocols, allow)
    own = {
        label: {k: v for k, v in p.items() if not k.startswith("stage[")}
        for protocols in sides.values()
        for label, p in protocols.items()
    }
    return allowed + guard_protocols(own, allow)


def compare_items(
    a_runs: list[Path],
    b_runs: list[Path],
    *,
    allow_diff: Iterable[str] = (),
    seed: int = 0,
    n_boot: int = 2000,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The paired comparison of side A with side B (the compare_items.json document)."""
    pairing, pairs = pair_runs(a_runs, b_runs)
    allowed = guard(a_runs, b_runs, allow_diff)
    results = [
        compare_pair(
            capability_outcomes(a),
            capability_outcomes(b),
            seed=seed + i,
            n_boot=n_boot,
            alpha=alpha,
        )
        | {"label": label}
        for i, (label, a, b) in enumerate(pairs)
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "pairing": pairing,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        "allowed_differences": [d.to_dict() for d in allowed],
        "pairs": results,
        "across_pairs": across_pairs(results, [p[0] for p in pairs]) if len(pairs) > 1 else None,
    }


def plot_png(result: dict[str, Any], grouping: str = "class") -> bytes:
    """The flip matrix (summed over pairs) and a grouped bar chart of each group's accuracy on
    both sides (counts pooled over pairs, Wilson intervals), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persona_cli.stats import proportion_interval

    pairs = result["pairs"]
    keys = ("both_correct", "broken", "fixed", "both_wrong")
    counts = np.array([sum(p["overall"][k] for p in pairs) for k in keys]).reshape(2, 2)
    groups = sorted(set.intersection(*(set(p["groups"][grouping]) for p in pairs)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(5 + 0.8 * len(groups), 4))
    left.imshow(counts, cmap="Blues")
    for (i, j), c in np.ndenumerate(counts):
        left.text(j, i, str(c), ha="center", va="center")
    left.set_xticks([0, 1], ["B correct", "B wrong"])
    left.set_yticks([0, 1], ["A correct", "A wrong"])
    left.set_title("item flips")
    x = np.arange(len(groups))
    for offset, side in ((-0.2, "a"), (0.2, "b")):
        est = [
            proportion_interval(
                sum(p["groups"][grouping][g][f"accuracy_{side}"]["successes"] for p in pairs),
                sum(p["groups"][grouping][g]["n"] for p in pairs),
            )
            for g in groups
        ]
        rates = np.array([e.rate for e in est])
        err = np.array([[e.rate - e.low for e in est], [e.high - e.rate for e in est]])
        right.bar(x + offset, rates, 0.4, yerr=err, capsize=3, label=side.upper())
    right.set_xticks(x, groups, rotation=45, ha="right")
    right.set_ylim(0, 1)
    right.set_ylabel("accuracy (Wilson 95%)")
    right.set_title(f"accuracy by {grouping}")
    right.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
