"""persona-vectors shift: how two extractions of the same personas and questions differ.

The design: run A is the base model, run B the same model under an adapter stack (an EM
fine-tune). Per method, layer and persona: the cosine between A's and B's centroid and the L2
norm of their difference (B - A); per method and layer: the mean off-diagonal raw cosine of
each run and its change (B - A; negative = the fine-tune pulled the personas together).
Intervals are a paired percentile bootstrap over questions: each of `resamples` draws picks
Q question indices with replacement (a seeded numpy Generator), applies the same indices to
both runs' question_vectors and recomputes every figure from the resampled centroids.

Refusal (exit 3, `ProtocolMismatch`): the runs' protocols (`persona_cli.guard.protocol_of`) or
their vectors' metadata differ in anything but the adapter stack: method, layers, personas,
question set (ids and the exact user turns), chat template, base model, sampling. Adapter-stack
differences (`stage[i].FIELD` of the training runs behind the adapters) are the manipulation,
reported in shift.json under `declared_differences`.

Writes shift.json and one bar PNG per method (per layer, each persona's L2 shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import read_json, write_json
from persona_cli.errors import EXIT_PROTOCOL, UserError
from persona_cli.geometry.config import ShiftConfig
from persona_cli.geometry.extract import COMMAND as EXTRACT_COMMAND
from persona_cli.geometry.leakage import finished_run
from persona_cli.geometry.plots import plot_bars
from persona_cli.geometry.similarity import LEVEL, cosine, interval, nanmean
from persona_cli.geometry.vectors import QUESTION_VECTORS_FILE, VectorsMeta, read_vectors
from persona_cli.guard import ProtocolDifference, ProtocolMismatch, check_protocols, protocol_of
from persona_cli.protocol import DERIVED_FIELDS, details, method_protocol, recorded_fields
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import MANIFEST, SHIFT

COMMAND = "persona-vectors shift"
SHIFT_FILE = "shift.json"
SHIFT_VERSION = SHIFT.version
# the vectors' metadata that must agree (the adapter stack may differ: it is the manipulation)
_SAME_META = ("model", "methods", "layers", "personas", "questions", "question_set_sha256",
              "template_sha256")  # fmt: skip


@dataclass
class ShiftResult:
    run: RunDir
    doc: dict[str, Any]
    plots: list[Path]
    already_done: bool = False


class ShiftMismatch(ProtocolMismatch):
    """The shift refusal: names each differing field with its two values (exit 3)."""

    def __init__(self, differences: list[ProtocolDifference]):
        self.differences = differences
        parts = "; ".join(d.describe() for d in differences)
        UserError.__init__(
            self,
            f"refusing to compare extract runs that differ in more than the adapter stack: {parts}",
            exit_code=EXIT_PROTOCOL,
        )


def shift_figures(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Centroids [P, L, H] of A and B -> `cosine` and `l2` [L, P], `offdiag_a`, `offdiag_b`,
    `offdiag_delta` [L] (mean off-diagonal raw cosine)."""
    a, b = np.moveaxis(a, 1, 0), np.moveaxis(b, 1, 0)  # [L, P, H]
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), (a * b).sum(-1) / (na * nb), np.nan)
    off = ~np.eye(a.shape[1], dtype=bool)
    offdiag_a, offdiag_b = nanmean(cosine(a)[:, off]), nanmean(cosine(b)[:, off])
    return {
        "cosine": cos,
        "l2": np.linalg.norm(b - a, axis=-1),
        "offdiag_a": offdiag_a,
        "offdiag_b": offdiag_b,
        "offdiag_delta": offdiag_b - offdiag_a,
    }


def paired_bootstrap(
    qa: np.ndarray, qb: np.ndarray, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """[resamples, ...] of every shift figure; one draw of question indices serves both runs."""
    rng = np.random.default_rng(seed)
    qa, qb = qa.astype(np.float64), qb.astype(np.float64)
    n_q = qa.shape[1]
    draws: dict[str, list[np.ndarray]] = {}
    for _ in range(resamples):
        idx = rng.integers(0, n_q, size=n_q)
        for name, value in shift_figures(qa[:, idx].mean(1), qb[:, idx].mean(1)).items():
            draws.setdefault(name, []).append(value)
    return {k: np.stack(v) for k, v in draws.items()}


def _guard(runs: dict[str, Path], metas: dict[str, VectorsMeta]) -> list[ProtocolDifference]:
    """Refuse unless the runs differ only in their adapter stacks; returns those differences."""
    protocols = {
        label: {
            **protocol_of(run),
            **{f"vectors.{k}": getattr(metas[label], k) for k in _SAME_META},
        }
        for label, run in runs.items()
    }
    refused, _ = check_protocols(protocols, ())
    stack = [d for d in refused if d.field.startswith("stage[")]
    others = [d for d in refused if not d.field.startswith("stage[")]
    if others:
        raise ShiftMismatch(others)
    return stack


def _plan(cfg: ShiftConfig) -> dict[str, Any]:
    if cfg.resamples < 1:
        raise UserError(f"--resamples {cfg.resamples}: must be >= 1")
    runs = {
        "A": finished_run(cfg.run_a, EXTRACT_COMMAND, "A"),
        "B": finished_run(cfg.run_b, EXTRACT_COMMAND, "B"),
    }
    if runs["A"].resolve() == runs["B"].resolve():
        raise UserError(f"A and B are the same run ({cfg.run_a})")
    loaded = {k: read_vectors(r / QUESTION_VECTORS_FILE) for k, r in runs.items()}
    metas = {k: meta for k, (_, meta) in loaded.items()}
    declared = _guard(runs, metas)
    if len(metas["A"].personas) < 2:
        raise UserError(f"A {cfg.run_a}: has {len(metas['A'].personas)} persona; needs >= 2")
    return {
        "runs": runs,
        "meta": metas["A"],
        "adapters": {k: m.adapters for k, m in metas.items()},
        "question_vectors": {k: tensors for k, (tensors, _) in loaded.items()},
        "declared": declared,
    }


def _layer_doc(
    point: dict[str, np.ndarray], draws: dict[str, np.ndarray], li: int, meta: VectorsMeta
) -> dict[str, Any]:
    return {
        "layer": meta.layers[li],
        "personas": {
            p: {k: interval(point[k][li, i], draws[k][:, li, i]) for k in ("cosine", "l2")}
            for i, p in enumerate(meta.personas)
        },
        "mean_offdiag_raw": {
            k: interval(point[f"offdiag_{k}"][li], draws[f"offdiag_{k}"][:, li])
            for k in ("a", "b", "delta")
        },
    }


def run_shift(cfg: ShiftConfig, out: str | Path, *, force: bool = False) -> ShiftResult:
    plan = _plan(cfg)
    runs, meta = plan["runs"], plan["meta"]
    config = {**cfg.__dict__, "run_a": str(runs["A"].resolve()), "run_b": str(runs["B"].resolve())}
    run = open_run(out, command=COMMAND, config=config, force=force)
    names = {m: f"shift_{m}.png" for m in meta.methods}
    if run.done:
        doc = read_json(run.file(SHIFT_FILE))
        return ShiftResult(run, doc, [run.file(n) for n in names.values()], already_done=True)
    results: dict[str, list[dict[str, Any]]] = {}
    plots = []
    for mi, method in enumerate(meta.methods):
        qa, qb = plan["question_vectors"]["A"][method], plan["question_vectors"]["B"][method]
        # the centroids recomputed in float64, exactly as each bootstrap draw recomputes them
        point = shift_figures(qa.astype(np.float64).mean(1), qb.astype(np.float64).mean(1))
        draws = paired_bootstrap(qa, qb, cfg.resamples, cfg.seed + mi)
        results[method] = [_layer_doc(point, draws, li, meta) for li in range(len(meta.layers))]
        panels = {
            f"layer {d['layer']}": {
                p: (v["l2"]["estimate"], v["l2"]["low"], v["l2"]["high"])
                for p, v in d["personas"].items()
            }
            for d in results[method]
        }
        title = f"{method}: centroid shift B - A per persona ({meta.model['spec']})"
        plots.append(
            plot_bars(panels, title=title, ylabel="L2 norm of B - A", path=run.file(names[method]))
        )
    doc = {
        "schema_version": SHIFT_VERSION,
        "run_a": config["run_a"],
        "run_b": config["run_b"],
        "model": meta.model,
        "adapters": plan["adapters"],
        "declared_differences": [d.to_dict() for d in plan["declared"]],
        "personas": meta.personas,
        "questions": meta.questions,
        "layers": meta.layers,
        "methods": meta.methods,
        "bootstrap": {"over": "questions", "paired": True, "resamples": cfg.resamples,
                      "seed": cfg.seed, "level": LEVEL, "interval": "percentile"},
        "results": results,
    }  # fmt: skip
    write_json(run.file(SHIFT_FILE), doc)
    _finish(run, cfg, plan)
    return ShiftResult(run, doc, plots)


def _finish(run: RunDir, cfg: ShiftConfig, plan: dict[str, Any]) -> None:
    runs = plan["runs"]
    manifest = read_json(runs["A"] / MANIFEST)
    fields = recorded_fields(manifest, runs["A"] / MANIFEST)
    run.finish(
        inputs={f"{k}_question_vectors": r / QUESTION_VECTORS_FILE for k, r in runs.items()},
        model=manifest["model"],
        chat_template=manifest["chat_template"],
        protocol=method_protocol(**{k: v for k, v in fields.items() if k not in DERIVED_FIELDS})
        | details(resamples=cfg.resamples, adapters=plan["adapters"]),
        seeds=[cfg.seed],
        extra={"run_a": str(runs["A"].resolve()), "run_b": str(runs["B"].resolve())},
    )
