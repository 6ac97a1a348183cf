"""Paired comparison of runs scored on the same items: flips, McNemar, per-group deltas, seeds.

Two sides, A (e.g. the base model) and B (e.g. a fine-tune), each one or more finished runs of
one kind over the same items: eval-capability (outcome: correct), eval-markers (the completion
carries the marker, on the same (persona, question, sample) grid) or judge-align (EM, on the
same answer keys); `persona_cli.outcomes` reads each kind into `Outcomes`, and everything below
is the same for all three. Per pair of runs, every item is an (A yes, B yes) pair: the flip table
(both, a_only = A yes / B no, b_only = A no / B yes, neither; for capability a_only is "broken"
and b_only "fixed"), the share of A's yes items that are no in B (`a_only_share`: "the share of
the base model's correct items broken"), the exact McNemar test on the discordant counts
(statsmodels; it treats items as independent pairs), and rate deltas (B - A) overall and per
group with paired percentile bootstrap intervals that resample clusters (capability: items;
markers and judge: questions, with all their cells) keeping both sides of a cluster together,
one seeded numpy Generator per pair, its seed written down. Items without an outcome on either
side (judge: unscored or not coherent) are left out of that pair and counted.

With several runs per side (one per seed of a fine-tune) the pairs are matched by
`guard.lineage_seed` when every run has a distinct one on both sides, else by order; each delta
is then summarised across pairs (mean, t-interval via `stats.summarize_seeds`) with how many pairs
agree in sign.

The guard (`guard.guard_protocols`, each run's protocol read once): runs within a side must agree
on every guarded field, their adapters' training runs included; across the sides only the runs'
own fields are compared (item set, scorer, sampling, marker, judge, chat template, system prompt:
the adapter stack behind B is the manipulation). A refused difference raises `ProtocolMismatch`
(exit 3); runs over different items (ids that are not the same set) are an input error (exit 2).

    persona-cli compare-items runs/cap_base runs/cap_em --out runs/cmp --plot
"""

from __future__ import annotations

import glob
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.errors import InputError, UserError
from persona_cli.guard import guard_protocols, lineage_seed, protocol_of
from persona_cli.outcomes import KINDS, Kind, Outcomes, kind_of, read_outcomes
from persona_cli.paired_config import CompareItemsConfig
from persona_cli.schemas import COMPARE_ITEMS

SCHEMA_VERSION = COMPARE_ITEMS.version
RESULT = "compare_items.json"
PLOT = "compare_items.png"
BOOT_CHUNK = 256  # bootstrap draws per matrix product (bounds memory on large item sets)


def flips(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The 2x2 table of paired outcomes, the a_only/b_only shares and the exact McNemar p."""
    from statsmodels.stats.contingency_tables import mcnemar

    both = int(np.sum(a & b))
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    neither = int(np.sum(~a & ~b))
    p = float(mcnemar([[both, a_only], [b_only, neither]], exact=True).pvalue)
    return {
        "both": both,
        "a_only": a_only,
        "b_only": b_only,
        "neither": neither,
        "a_only_share": a_only / (both + a_only) if both + a_only else None,
        "b_only_share": b_only / (b_only + neither) if b_only + neither else None,
        "mcnemar_exact_p": p,
    }


def cluster_bootstrap(
    a: np.ndarray, b: np.ndarray, clusters: Sequence[str], rng: np.random.Generator, n_boot: int
) -> np.ndarray:
    """`n_boot` draws of mean(B) - mean(A) over a resample of the clusters with replacement
    (each draw: `rng.integers(0, C, C)` cluster picks, all items of a picked cluster kept)."""
    names, codes = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    c = len(names)
    diff = np.bincount(codes, weights=b.astype(float) - a.astype(float), minlength=c)
    size = np.bincount(codes, minlength=c).astype(float)
    draws = rng.integers(0, c, size=(n_boot, c))
    out = np.empty(n_boot)
    for start in range(0, n_boot, BOOT_CHUNK):
        chunk = draws[start : start + BOOT_CHUNK]
        rows = np.arange(len(chunk))[:, None] * c
        weights = np.bincount((chunk + rows).ravel(), minlength=len(chunk) * c)
        weights = weights.reshape(len(chunk), c).astype(float)
        out[start : start + len(chunk)] = (weights @ diff) / (weights @ size)
    return out


def paired_delta(
    a: np.ndarray,
    b: np.ndarray,
    clusters: Sequence[str],
    rng: np.random.Generator,
    n_boot: int,
    alpha: float,
) -> dict[str, Any]:
    """The rate of each side (Wilson) and delta B - A with a percentile cluster-bootstrap
    interval that keeps each item's pair together."""
    from persona_cli.stats import proportion_interval

    n = int(a.size)
    boot = cluster_bootstrap(a, b, clusters, rng, n_boot)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "n": n,
        "n_clusters": len(set(clusters)),
        "rate_a": proportion_interval(int(a.sum()), n, alpha=alpha).to_dict(),
        "rate_b": proportion_interval(int(b.sum()), n, alpha=alpha).to_dict(),
        "delta": float(b.mean() - a.mean()),
        "delta_low": float(low),
        "delta_high": float(high),
    }


def align(a: Outcomes, b: Outcomes) -> Outcomes:
    """B's outcomes in A's item order; refuses when the two hold different items."""
    if a.keys == b.keys:
        return b
    only_a = sorted(set(a.keys) - set(b.keys))
    only_b = sorted(set(b.keys) - set(a.keys))
    if only_a or only_b:
        example = (only_a or only_b)[0]
        raise InputError(
            b.run,
            f"its items are not those of {a.run}: {len(only_a)} only in A, {len(only_b)} only in "
            f"B (e.g. {example!r})",
        )
    where = {k: i for i, k in enumerate(b.keys)}
    order = np.array([where[k] for k in a.keys])
    return Outcomes(
        run=b.run,
        kind=b.kind,
        definition=b.definition,
        keys=a.keys,
        values=b.values[order],
        defined=b.defined[order],
        clusters=tuple(b.clusters[i] for i in order),
        groups={g: tuple(v[i] for i in order) for g, v in b.groups.items()},
    )


def compare_pair(
    a: Outcomes, b: Outcomes, *, seed: int, n_boot: int = 2000, alpha: float = 0.05
) -> dict[str, Any]:
    """Flips and deltas of one pair of runs, overall and per group of every grouping, over the
    items with an outcome on both sides."""
    b = align(a, b)
    rng = np.random.default_rng(seed)
    keep = a.defined & b.defined
    if not keep.any():
        raise InputError(b.run, f"no item has an outcome in both {a.run} and {b.run}")
    va, vb = a.values[keep], b.values[keep]
    clusters = [c for c, k in zip(a.clusters, keep, strict=True) if k]
    groups: dict[str, dict[str, Any]] = {}
    for name, labels in a.groups.items():
        kept = [g for g, k in zip(labels, keep, strict=True) if k]
        per: dict[str, Any] = {}
        for group in sorted({g for g in kept if g is not None}):
            mask = np.array([g == group for g in kept])
            cl = [c for c, m in zip(clusters, mask, strict=True) if m]
            per[group] = paired_delta(va[mask], vb[mask], cl, rng, n_boot, alpha) | flips(
                va[mask], vb[mask]
            )
        groups[name] = per
    overall = paired_delta(va, vb, clusters, rng, n_boot, alpha) | flips(va, vb)
    return {
        "a": a.run,
        "b": b.run,
        "bootstrap_seed": seed,
        "n_items": len(a.keys),
        "n_undefined": int((~keep).sum()),
        "overall": overall,
        "groups": groups,
    }


def _sign_agreement(values: Sequence[float], mean: float) -> dict[str, Any]:
    sign = np.sign(mean)
    return {
        "n_positive": int(sum(v > 0 for v in values)),
        "n_negative": int(sum(v < 0 for v in values)),
        "n_agree_with_mean": int(sum(np.sign(v) == sign for v in values)) if sign else 0,
    }


def across_pairs(pairs: list[dict[str, Any]], labels: list[int], alpha: float) -> dict[str, Any]:
    """Each delta (and the a_only share) summarised over pairs: `summarize_seeds` (mean,
    t-interval) keyed by the pair label (its seed, or its position), plus sign agreement.
    Groups missing from any pair are left out."""
    from persona_cli.stats import summarize_seeds

    def summary(values: list[float | None]) -> dict[str, Any] | None:
        if any(v is None for v in values):
            return None
        s = summarize_seeds(dict(zip(labels, values, strict=True)), alpha=alpha)  # type: ignore[arg-type]
        return s | _sign_agreement(s["values"], s["mean"])

    out: dict[str, Any] = {
        "delta": summary([p["overall"]["delta"] for p in pairs]),
        "a_only_share": summary([p["overall"]["a_only_share"] for p in pairs]),
        "groups": {},
    }
    for name in pairs[0]["groups"]:
        shared = set.intersection(*(set(p["groups"][name]) for p in pairs))
        out["groups"][name] = {
            g: summary([p["groups"][name][g]["delta"] for p in pairs]) for g in sorted(shared)
        }
    return out


def side_runs(side: str, pattern: str) -> list[Path]:
    """The run directories a side's argument names (a directory or a glob), sorted."""
    runs = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
    if not runs:
        raise UserError(f"compare-items side {side} {pattern!r}: matched no run directories")
    return runs


def pair_runs(a_runs: list[Path], b_runs: list[Path]) -> tuple[str, list[tuple[int, Path, Path]]]:
    """(pairing, [(label, A run, B run)]): by lineage seed when every run has one, distinct
    within its side, and both sides hold the same seeds; else by order (label = position)."""
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


def run_kind(runs: list[Path]) -> Kind:
    """The one kind of run every run is; mixed kinds are an error naming the first odd run."""
    kinds = [kind_of(r) for r in runs]
    odd = next((r for r, k in zip(runs, kinds, strict=True) if k != kinds[0]), None)
    if odd is not None:
        raise InputError(odd, f"a {kind_of(odd).command} run among {kinds[0].command} runs")
    return kinds[0]


def guard(a_runs: list[Path], b_runs: list[Path], allow_diff: Sequence[str]) -> list[Any]:
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


def compare_items(cfg: CompareItemsConfig) -> dict[str, Any]:
    """The paired comparison of side A with side B (the compare_items.json document)."""
    a_runs, b_runs = side_runs("A", cfg.a), side_runs("B", cfg.b)
    kind = run_kind(a_runs + b_runs)
    grouping = cfg.grouping or kind.groupings[0]
    if grouping not in kind.groupings:
        raise UserError(
            f"--grouping {grouping!r}: {kind.command} runs group by {', '.join(kind.groupings)}"
        )
    pairing, pairs = pair_runs(a_runs, b_runs)
    allowed = guard(a_runs, b_runs, cfg.allow_diff)
    definitions = set()
    results = []
    for i, (label, a, b) in enumerate(pairs):
        oa, ob = read_outcomes(a), read_outcomes(b)
        definitions |= {oa.definition, ob.definition}
        pair = compare_pair(oa, ob, seed=cfg.seed + i, n_boot=cfg.n_boot, alpha=cfg.alpha)
        results.append(pair | {"label": label})
    if len(definitions) > 1:
        raise UserError(f"compare-items: the runs define the outcome differently: {definitions}")
    if grouping not in results[0]["groups"] or not results[0]["groups"][grouping]:
        grouping = next(g for g in kind.groupings if results[0]["groups"].get(g))
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind.command,
        "outcome": definitions.pop(),
        "labels": {"yes": kind.yes, "no": kind.no, "a_only": kind.a_only, "b_only": kind.b_only},
        "grouping": grouping,
        "pairing": pairing,
        "alpha": cfg.alpha,
        "n_boot": cfg.n_boot,
        "seed": cfg.seed,
        "allowed_differences": [d.to_dict() for d in allowed],
        "runs": {"a": [str(r) for r in a_runs], "b": [str(r) for r in b_runs]},
        "pairs": results,
        "across_pairs": across_pairs(results, [p[0] for p in pairs], cfg.alpha)
        if len(pairs) > 1
        else None,
    }


def plot_png(result: dict[str, Any], grouping: str | None = None) -> bytes:
    """The flip matrix (summed over pairs) and a grouped bar chart of each group's rate on both
    sides (counts pooled over pairs, Wilson intervals), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persona_cli.stats import proportion_interval

    grouping = grouping or result["grouping"]
    words = result["labels"]
    pairs = result["pairs"]
    keys = ("both", "a_only", "b_only", "neither")
    counts = np.array([sum(p["overall"][k] for p in pairs) for k in keys]).reshape(2, 2)
    groups = sorted(set.intersection(*(set(p["groups"][grouping]) for p in pairs)))
    across = result["across_pairs"]
    panels = 3 if across is not None else 2
    width = max(3.5, 0.45 * len(groups))  # inches per bar panel
    fig, axes = plt.subplots(
        1,
        panels,
        figsize=(4 + width * (panels - 1), 4.8),
        gridspec_kw={"width_ratios": [4, width, width][:panels]},
    )
    left, right = axes[0], axes[1]
    left.imshow(counts, cmap="Blues")
    names = np.array([["both", words["a_only"]], [words["b_only"], "neither"]])
    for (i, j), c in np.ndenumerate(counts):
        color = "white" if c > counts.max() / 2 else "black"
        left.text(j, i, f"{c}\n{names[i, j]}", ha="center", va="center", color=color)
    left.set_xticks([0, 1], [f"B {words['yes']}", f"B {words['no']}"])
    left.set_yticks([0, 1], [f"A {words['yes']}", f"A {words['no']}"])
    share = pairs[0]["overall"]["a_only_share"] if len(pairs) == 1 else None
    left.set_title(
        f"item flips ({len(pairs)} pair{'s' if len(pairs) > 1 else ''})"
        + (f"\n{words['a_only']}: {share:.0%} of A {words['yes']}" if share is not None else "")
    )
    x = np.arange(len(groups))
    for offset, side in ((-0.2, "a"), (0.2, "b")):
        est = [
            proportion_interval(
                sum(p["groups"][grouping][g][f"rate_{side}"]["successes"] for p in pairs),
                sum(p["groups"][grouping][g]["n"] for p in pairs),
            )
            for g in groups
        ]
        rates = np.array([e.rate for e in est])
        err = np.array([[e.rate - e.low for e in est], [e.high - e.rate for e in est]])
        runs = result["runs"][side]
        name = Path(runs[0]).name + (f" +{len(runs) - 1} seeds" if len(runs) > 1 else "")
        right.bar(x + offset, rates, 0.4, yerr=err, capsize=3, label=f"{side.upper()}: {name}")
    right.set_xticks(x, groups, rotation=45, ha="right", fontsize=8)
    right.set_xlabel(grouping)
    right.set_ylim(0, 1.3)
    right.set_yticks(np.linspace(0, 1, 6))
    right.set_ylabel(f"{words['yes']} rate (Wilson 95%, pooled)")
    right.set_title(f"{result['kind']}: by {grouping}")
    right.legend(loc="upper left", fontsize=8, ncol=2)
    if across is not None:
        seeds_ax = axes[2]
        summaries = [across["groups"][grouping].get(g) for g in groups]
        for i, s in enumerate(summaries):
            if s is None:
                continue
            seeds_ax.scatter([i] * len(s["values"]), np.array(s["values"]) * 100, s=12, c="gray")
            if s["low"] is not None:
                low, high = 100 * (s["mean"] - s["low"]), 100 * (s["high"] - s["mean"])
                seeds_ax.errorbar(
                    i, 100 * s["mean"], yerr=[[low], [high]], fmt="o", capsize=3, color="C0"
                )
            else:
                seeds_ax.plot(i, 100 * s["mean"], "o", color="C0")
        seeds_ax.axhline(0, color="black", lw=0.8)
        seeds_ax.set_xticks(x, groups, rotation=45, ha="right", fontsize=8)
        seeds_ax.set_xlabel(grouping)
        seeds_ax.set_ylabel(f"B - A (pp): mean, {1 - result['alpha']:.0%} t-interval, seeds")
        seeds_ax.set_title(f"per seed ({len(pairs)} pairs)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class CompareItemsOutcome:
    result: dict[str, Any] | None  # None: the run directory was finished already
    out: Path | None


def run_compare_items(
    cfg: CompareItemsConfig, out: Path | None, *, force: bool = False
) -> CompareItemsOutcome:
    """`compare_items`, and with `out` a run directory holding compare_items.json (and the PNG
    with `cfg.plot`); every input is read and guarded before the directory is created."""
    from persona_cli.artifacts import write_bytes_atomic, write_json
    from persona_cli.rundir import is_done, open_run

    if cfg.plot and out is None:
        raise UserError("--plot writes into the run directory: give --out")
    if out is not None and is_done(out) and not force:
        return CompareItemsOutcome(None, out)
    result = compare_items(cfg)
    if out is not None:
        run = open_run(out, command="compare-items", config=cfg.to_dict(), force=force)
        write_json(run.file(RESULT), result)
        if cfg.plot:
            write_bytes_atomic(run.file(PLOT), plot_png(result))
        rows_file = KINDS[result["kind"]].rows
        runs = result["runs"]
        run.finish(
            inputs={f"{side}:{r}": Path(r) / rows_file for side in ("a", "b") for r in runs[side]}
        )
    return CompareItemsOutcome(result, out)
