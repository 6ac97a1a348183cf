"""persona-vectors leakage: does a marker leak to the personas nearest its source?

Joins a similarity run with an eval-markers run. Per bystander (every persona of both runs
except the source and the coupling's negatives, as eval-markers' summary.json marks them; with
the reference matrix also except the reference persona, whose row is undefined) the table holds
its cosine to the source in one matrix (`centred` by default) and its marker rate. Per (method,
layer): Pearson and Spearman correlation with their p-values (scipy.stats), and a percentile
bootstrap 95% interval of each coefficient over bystanders (drawn with replacement, a seeded
numpy Generator; draws where a side is constant are left out).

Refusals: runs of different base models or chat templates (exit 3: the geometry would describe
another model than the one whose markers were counted), fewer than 3 bystanders in common, a
source absent from either run (exit 2). The geometry may come from the base model while the
markers come from a coupling adapter on it: that is the design, so adapters are recorded, not
compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import read_json, write_json
from persona_cli.errors import EXIT_PROTOCOL, UserError
from persona_cli.geometry.config import LeakageConfig
from persona_cli.geometry.plots import plot_scatter
from persona_cli.geometry.similarity import COMMAND as SIMILARITY_COMMAND
from persona_cli.geometry.similarity import KINDS, LEVEL, SIMILARITY_FILE
from persona_cli.protocol import details, method_protocol, recorded_fields
from persona_cli.rundir import RunDir, is_done, open_run
from persona_cli.schemas import CONFIG, LEAKAGE, MANIFEST

COMMAND = "persona-vectors leakage"
LEAKAGE_FILE = "leakage.json"
LEAKAGE_VERSION = LEAKAGE.version
MIN_BYSTANDERS = 3


@dataclass
class LeakageResult:
    run: RunDir
    doc: dict[str, Any]
    already_done: bool = False


def finished_run(path: str, command: str, option: str) -> Path:
    run = Path(path)
    if not is_done(run) or read_json(run / CONFIG).get("command") != command:
        raise UserError(f"{option} {path}: not a finished {command} run")
    return run


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman coefficients and p-values; None where a side is constant or a
    cosine is undefined (a zero vector, e.g. prompt-last at layer 0 after centring)."""
    from scipy import stats

    if not np.isfinite(x).all() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson_r": None, "pearson_p": None, "spearman_rho": None, "spearman_p": None}
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {
        "pearson_r": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
    }


def bootstrap_correlations(
    x: np.ndarray, y: np.ndarray, resamples: int, seed: int
) -> dict[str, dict[str, float | None]]:
    """Percentile intervals of Pearson r and Spearman rho over resampled bystanders."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"pearson_r": [], "spearman_rho": []}
    for _ in range(resamples):
        idx = rng.integers(0, len(x), size=len(x))
        xs, ys = x[idx], y[idx]
        if not np.isfinite(xs).all() or np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        draws["pearson_r"].append(float(np.corrcoef(xs, ys)[0, 1]))
        draws["spearman_rho"].append(float(np.corrcoef(rankdata(xs), rankdata(ys))[0, 1]))
    alpha = (1 - LEVEL) / 2
    out: dict[str, dict[str, float | None]] = {}
    for name, values in draws.items():
        if values:
            low, high = np.quantile(values, [alpha, 1 - alpha])
            out[name] = {"low": float(low), "high": float(high), "resamples_used": len(values)}
        else:
            out[name] = {"low": None, "high": None, "resamples_used": 0}
    return out


def _plan(cfg: LeakageConfig) -> dict[str, Any]:
    if cfg.matrix not in KINDS:
        raise UserError(f"--matrix {cfg.matrix!r}: choose from {', '.join(KINDS)}")
    sim_run = finished_run(cfg.similarity_run, SIMILARITY_COMMAND, "--similarity")
    markers_run = finished_run(cfg.markers_run, "eval-markers", "--markers")
    sim = read_json(sim_run / SIMILARITY_FILE)
    summary = read_json(markers_run / "summary.json")
    markers_manifest = read_json(markers_run / MANIFEST)
    if sim["model"]["revision"] != summary["model"]["revision"]:
        raise UserError(
            f"refusing to join runs of different models: {sim_run} describes "
            f"{sim['model']['spec']!r}, {markers_run} counted markers of "
            f"{summary['model']['spec']!r} (fingerprints differ)",
            exit_code=EXIT_PROTOCOL,
        )
    if sim["template_sha256"] != markers_manifest["chat_template"]["template_sha256"]:
        raise UserError(
            f"refusing to join runs with different chat templates: {sim_run}, {markers_run}",
            exit_code=EXIT_PROTOCOL,
        )
    source = cfg.source or (summary["source"] or {}).get("persona")
    if source is None:
        raise UserError(f"--source: {markers_run} names no source persona; pass --source")
    for where, personas in ((sim_run, sim["personas"]), (markers_run, summary["personas"])):
        if source not in personas:
            raise UserError(f"--source {source!r}: not a persona of {where}")
    if cfg.matrix == "reference" and source == sim["reference"]:
        raise UserError(f"--matrix reference: the source {source!r} is the reference persona")
    negatives = (summary["negatives"] or {}).get("personas", []) if summary["negatives"] else []
    excluded = {source, *negatives} | ({sim["reference"]} if cfg.matrix == "reference" else set())
    bystanders = [p for p in summary["personas"] if p not in excluded and p in sim["personas"]]
    if len(bystanders) < MIN_BYSTANDERS:
        raise UserError(
            f"--similarity {sim_run} and --markers {markers_run}: {len(bystanders)} bystander(s) "
            f"in common ({', '.join(bystanders) or 'none'}); the join needs >= {MIN_BYSTANDERS}"
        )
    return {
        "sim_run": sim_run, "markers_run": markers_run, "sim": sim, "summary": summary,
        "source": source, "negatives": negatives, "bystanders": bystanders,
    }  # fmt: skip


def run_leakage(cfg: LeakageConfig, out: str | Path, *, force: bool = False) -> LeakageResult:
    plan = _plan(cfg)
    sim, summary, source, bystanders = (
        plan["sim"],
        plan["summary"],
        plan["source"],
        plan["bystanders"],
    )
    config = {
        **cfg.__dict__,
        "similarity_run": str(plan["sim_run"].resolve()),
        "markers_run": str(plan["markers_run"].resolve()),
        "source": source,
    }
    run = open_run(out, command=COMMAND, config=config, force=force)
    if run.done:
        return LeakageResult(run, read_json(run.file(LEAKAGE_FILE)), already_done=True)
    si = sim["personas"].index(source)
    rates = np.array([summary["rates"][p]["rate"] for p in bystanders])
    results: dict[str, list[dict[str, Any]]] = {}
    for mi, method in enumerate(sim["methods"]):
        results[method] = []
        for li, layer_doc in enumerate(sim["results"][method]):
            m = layer_doc["matrices"][cfg.matrix]
            cos = np.array([m[si][sim["personas"].index(p)] for p in bystanders], dtype=float)
            layer = layer_doc["layer"]
            scatter = f"scatter_{method}_layer{layer:02d}.png"
            plot_scatter(
                list(cos), list(rates), bystanders,
                title=f"{method}, layer {layer}: marker rate vs {cfg.matrix} cosine to {source}",
                xlabel=f"{cfg.matrix} cosine to {source}", path=run.file(scatter),
            )  # fmt: skip
            seed = cfg.seed + 1000 * mi + li
            results[method].append(
                {
                    "layer": layer,
                    "cosine_to_source": {
                        p: float(c) if np.isfinite(c) else None
                        for p, c in zip(bystanders, cos, strict=True)
                    },
                    **correlations(cos, rates),
                    "bootstrap": bootstrap_correlations(cos, rates, cfg.resamples, seed),
                    "scatter": scatter,
                }
            )
    doc = {
        "schema_version": LEAKAGE_VERSION,
        "similarity_run": config["similarity_run"],
        "markers_run": config["markers_run"],
        "model": sim["model"],
        "geometry_adapters": sim["adapters"],
        "markers_adapters": summary["adapters"],
        "marker": summary["marker"],
        "source": source,
        "negatives": plan["negatives"],
        "matrix": cfg.matrix,
        "bystanders": [
            {"persona": p, **{k: summary["rates"][p][k] for k in ("rate", "successes", "n")}}
            for p in bystanders
        ],
        "bootstrap": {"over": "bystanders", "resamples": cfg.resamples, "seed": cfg.seed,
                      "level": LEVEL, "interval": "percentile"},
        "results": results,
    }  # fmt: skip
    write_json(run.file(LEAKAGE_FILE), doc)
    _finish(run, cfg, plan)
    return LeakageResult(run, doc)


def _finish(run: RunDir, cfg: LeakageConfig, plan: dict[str, Any]) -> None:
    sim_manifest = read_json(plan["sim_run"] / MANIFEST)
    geometry = recorded_fields(sim_manifest, plan["sim_run"] / MANIFEST)
    markers = recorded_fields(
        read_json(plan["markers_run"] / MANIFEST), plan["markers_run"] / MANIFEST
    )
    run.finish(
        inputs={
            "similarity": plan["sim_run"] / SIMILARITY_FILE,
            "markers_summary": plan["markers_run"] / "summary.json",
        },
        model=sim_manifest["model"],
        chat_template=sim_manifest["chat_template"],
        protocol=method_protocol(
            **{k: v for k, v in geometry.items() if k.startswith("geometry_")},
            marker=markers["marker"],
            marker_case_sensitive=markers["marker_case_sensitive"],
        )
        | details(matrix=cfg.matrix, source=plan["source"], resamples=cfg.resamples),
        seeds=[cfg.seed],
    )
