"""persona-vectors similarity: cosine structure of the persona centroids, per method and layer.

Three matrices per (method, layer), each the cosine between persona vectors:
- `raw`: the centroids themselves;
- `centred`: each centroid minus the mean of all personas' centroids (removes the direction
  every persona shares, which dominates raw cosines of hidden states);
- `reference`: each centroid minus the reference persona's (default `assistant`); the
  reference's own row and column are undefined (a zero vector) and recorded as null.
Figures per (method, layer): the mean off-diagonal cosine of each matrix and each persona's
cosine to the reference (raw and centred), each with a percentile bootstrap 95% interval over
questions: `resamples` times, draw Q questions with replacement (a seeded numpy Generator),
recompute every centroid as the mean of the drawn per-question vectors, recompute the figure.

Writes similarity.json and one heatmap PNG per (method, layer) into its own run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import read_json, write_json
from persona_cli.errors import UserError
from persona_cli.geometry.config import SimilarityConfig
from persona_cli.geometry.extract import COMMAND as EXTRACT_COMMAND
from persona_cli.geometry.plots import plot_cosines
from persona_cli.geometry.vectors import (
    CENTROIDS_FILE,
    QUESTION_VECTORS_FILE,
    VectorsMeta,
    read_vectors,
)
from persona_cli.protocol import DERIVED_FIELDS, details, method_protocol, recorded_fields
from persona_cli.rundir import RunDir, is_done, open_run
from persona_cli.schemas import CONFIG, MANIFEST, SIMILARITY

COMMAND = "persona-vectors similarity"
SIMILARITY_FILE = "similarity.json"
SIMILARITY_VERSION = SIMILARITY.version
KINDS = ("raw", "centred", "reference")
LEVEL = 0.95


@dataclass
class SimilarityResult:
    run: RunDir
    doc: dict[str, Any]
    heatmaps: list[Path]
    already_done: bool = False


def cosine(x: np.ndarray) -> np.ndarray:
    """[..., P, H] -> [..., P, P] cosine; a zero vector's row and column are NaN."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norms > 0, x / norms, np.nan)
    return np.einsum("...ih,...jh->...ij", unit, unit)


def matrices(centroids: np.ndarray, ref: int) -> dict[str, np.ndarray]:
    """[P, L, H] centroids -> kind -> [L, P, P] cosine matrices (see module doc)."""
    c = np.moveaxis(centroids.astype(np.float64), 1, 0)  # [L, P, H]
    return {
        "raw": cosine(c),
        "centred": cosine(c - c.mean(axis=1, keepdims=True)),
        "reference": cosine(c - c[:, ref : ref + 1, :]),
    }


def figures(mats: dict[str, np.ndarray], ref: int) -> dict[str, np.ndarray]:
    """`mean_offdiag.KIND` [L] and `to_reference.KIND` [L, P] (raw and centred)."""
    p = next(iter(mats.values())).shape[-1]
    off = ~np.eye(p, dtype=bool)
    out = {f"mean_offdiag.{k}": nanmean(m[:, off]) for k, m in mats.items()}
    for k in ("raw", "centred"):
        out[f"to_reference.{k}"] = mats[k][:, :, ref]
    return out


def nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite entries; NaN where there are none."""
    finite = np.isfinite(x)
    count = finite.sum(axis=-1)
    total = np.where(finite, x, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def bootstrap(
    question_vectors: np.ndarray, ref: int, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """[resamples, ...] of every figure, questions drawn with replacement."""
    rng = np.random.default_rng(seed)
    qv = question_vectors.astype(np.float64)
    n_q = qv.shape[1]
    draws: dict[str, list[np.ndarray]] = {}
    for _ in range(resamples):
        idx = rng.integers(0, n_q, size=n_q)
        for name, value in figures(matrices(qv[:, idx].mean(axis=1), ref), ref).items():
            draws.setdefault(name, []).append(value)
    return {k: np.stack(v) for k, v in draws.items()}


def interval(point: float, draws: np.ndarray) -> dict[str, float | None]:
    alpha = (1 - LEVEL) / 2
    finite = draws[np.isfinite(draws)]
    if not np.isfinite(point) or finite.size == 0:
        return {"estimate": None, "low": None, "high": None}
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return {"estimate": float(point), "low": float(low), "high": float(high)}


def _pairs(m: np.ndarray, personas: list[str]) -> dict[str, Any]:
    iu = np.triu_indices(len(personas), k=1)
    values = m[iu]
    keep = np.isfinite(values)
    if not keep.any():
        return {"nearest": None, "farthest": None}
    rows, cols, values = iu[0][keep], iu[1][keep], values[keep]
    hi, lo = int(np.argmax(values)), int(np.argmin(values))
    return {
        "nearest": [personas[rows[hi]], personas[cols[hi]], float(values[hi])],
        "farthest": [personas[rows[lo]], personas[cols[lo]], float(values[lo])],
    }


def _json_matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[float(v) if np.isfinite(v) else None for v in row] for row in m]


def _layer_doc(
    mats: dict[str, np.ndarray], point: dict[str, np.ndarray], draws: dict[str, np.ndarray],
    li: int, meta: VectorsMeta,
) -> dict[str, Any]:  # fmt: skip
    personas = meta.personas
    return {
        "layer": meta.layers[li],
        "matrices": {k: _json_matrix(mats[k][li]) for k in KINDS},
        "mean_offdiag": {
            k: interval(point[f"mean_offdiag.{k}"][li], draws[f"mean_offdiag.{k}"][:, li])
            for k in KINDS
        },
        "to_reference": {
            k: {
                p: interval(point[f"to_reference.{k}"][li, i], draws[f"to_reference.{k}"][:, li, i])
                for i, p in enumerate(personas)
            }
            for k in ("raw", "centred")
        },
        "pairs": {k: _pairs(mats[k][li], personas) for k in KINDS},
    }


def _check(cfg: SimilarityConfig) -> tuple[Path, dict[str, Any]]:
    run = Path(cfg.extract_run)
    if not is_done(run) or read_json(run / CONFIG).get("command") != EXTRACT_COMMAND:
        raise UserError(f"RUN {run}: not a finished persona-vectors extract run")
    if cfg.resamples < 1:
        raise UserError(f"--resamples {cfg.resamples}: must be >= 1")
    return run, read_json(run / MANIFEST)


def run_similarity(
    cfg: SimilarityConfig, out: str | Path, *, force: bool = False
) -> SimilarityResult:
    extract_run, manifest = _check(cfg)
    centroids, meta = read_vectors(extract_run / CENTROIDS_FILE)
    question_vectors, _ = read_vectors(extract_run / QUESTION_VECTORS_FILE)
    if cfg.reference not in meta.personas:
        raise UserError(
            f"--reference {cfg.reference!r}: not a persona of {extract_run} "
            f"(it has {', '.join(meta.personas)})"
        )
    if len(meta.personas) < 3:
        raise UserError(f"RUN {extract_run}: has {len(meta.personas)} persona(s); needs >= 3")
    config = {**cfg.__dict__, "extract_run": str(extract_run.resolve())}
    run = open_run(out, command=COMMAND, config=config, force=force)
    ref = meta.personas.index(cfg.reference)
    names = {m: [_heatmap_name(m, layer) for layer in meta.layers] for m in meta.methods}
    if run.done:
        doc = read_json(run.file(SIMILARITY_FILE))
        return SimilarityResult(run, doc, [run.file(n) for v in names.values() for n in v], True)
    results: dict[str, list[dict[str, Any]]] = {}
    heatmaps: list[Path] = []
    for i, method in enumerate(meta.methods):
        mats = matrices(centroids[method], ref)
        point = figures(mats, ref)
        draws = bootstrap(question_vectors[method], ref, cfg.resamples, cfg.seed + i)
        results[method] = [
            _layer_doc(mats, point, draws, li, meta) for li in range(len(meta.layers))
        ]
        for li, layer in enumerate(meta.layers):
            title = f"{method}, layer {layer} ({meta.model['spec']}); reference {cfg.reference}"
            panels = {k: mats[k][li] for k in KINDS}
            heatmaps.append(plot_cosines(panels, meta.personas, title, run.file(names[method][li])))
    doc = {
        "schema_version": SIMILARITY_VERSION,
        "extract_run": str(extract_run.resolve()),
        "model": meta.model,
        "adapters": meta.adapters,
        "personas": meta.personas,
        "questions": meta.questions,
        "layers": meta.layers,
        "methods": meta.methods,
        "reference": cfg.reference,
        "question_set_sha256": meta.question_set_sha256,
        "template_sha256": meta.template_sha256,
        "bootstrap": {"over": "questions", "resamples": cfg.resamples, "seed": cfg.seed,
                      "level": LEVEL, "interval": "percentile"},
        "results": results,
    }  # fmt: skip
    write_json(run.file(SIMILARITY_FILE), doc)
    fields = recorded_fields(manifest, extract_run / MANIFEST)
    run.finish(
        inputs={
            "centroids": extract_run / CENTROIDS_FILE,
            "question_vectors": extract_run / QUESTION_VECTORS_FILE,
        },
        model=manifest["model"],
        chat_template=manifest["chat_template"],
        protocol=method_protocol(**{k: v for k, v in fields.items() if k not in DERIVED_FIELDS})
        | details(reference=cfg.reference, resamples=cfg.resamples),
        seeds=[cfg.seed],
        extra={"adapters": manifest["adapters"], "extract_run": str(extract_run.resolve())},
    )
    return SimilarityResult(run, doc, heatmaps)


def _heatmap_name(method: str, layer: int) -> str:
    return f"heatmap_{method}_layer{layer:02d}.png"
