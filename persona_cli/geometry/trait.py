"""Trait vectors, persona_vectors style, and projection monitoring.

`persona-vectors trait RUN --positive P --negative N`: from a finished extract run that holds
both personas, v_l = centroid(P) - centroid(N) per layer for one method (`response-mean` or
`prompt-last`): the mean over questions of the positive persona's per-question vectors minus
the negative's. Written as trait.safetensors (one tensor, keyed by the method, [layers,
hidden] float32) with the extract run's metadata (`persona_cli.geometry.vectors.VectorsMeta`;
`personas` = [positive, negative]).
With `--filter-by JUDGE_RUN` (response-mean only): only the answer pairs a judge passed
(`persona_cli.geometry.judged`) count, and v_l = the mean over the kept positive answers of
their response-mean hidden state minus the same over the kept negative answers (pooled over
answers, as persona_vectors pools its filtered responses), from forward passes of the extract
run's model and adapters; pairs.jsonl.gz holds every pair with its scores and why it was
dropped.

`persona-vectors project --trait RUN --samples-run EVAL_RUN`: every completion of an
eval-markers run, under the persona and user turn it was generated with, is run through the
model that generated it (the samples run's model and adapter stack, which must share the
trait's base model); its score per layer is the mean hidden state over its answer tokens (as
`response-mean`) . v_l / |v_l|. An answer with no tokens has no score and is counted, not
scored 0. Writes projections.jsonl.gz (persona, question_id, sample_index, layer, projection)
and summary.json (per persona and layer: mean projection, n). With `intervened`, the forward
pass runs under the samples run's own ablations and all-position steering
(`persona_cli.geometry.steer.replay`): the scores are then of the residual stream the
generation saw (after an ablation at layer L, ~0 at L).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli import adapters as adapters_mod
from persona_cli import models
from persona_cli.artifacts import read_json, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.errors import UserError
from persona_cli.geometry import steer as steer_mod
from persona_cli.geometry.config import ProjectConfig, TraitConfig
from persona_cli.geometry.extract import COMMAND as EXTRACT_COMMAND
from persona_cli.geometry.extract import SAMPLES_FILE, persona_prompt, read_samples_run
from persona_cli.geometry.hidden import METHODS, RESPONSE_MEAN, Span, hidden_states
from persona_cli.geometry.judged import (
    JUDGE_COMMAND,
    JUDGMENTS_FILE,
    PAIRS_VERSION,
    PairRule,
    judged_pairs,
)
from persona_cli.geometry.leakage import finished_run
from persona_cli.geometry.vectors import (
    CENTROIDS_FILE,
    TRAIT_FILE,
    VectorsMeta,
    read_vectors,
    write_vectors,
)
from persona_cli.protocol import (
    details,
    generation_protocol,
    intervention_protocol,
    method_protocol,
)
from persona_cli.registry import load_personas
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import CONFIG, MANIFEST, PROJECT_SUMMARY, PROJECTIONS

TRAIT_COMMAND = "persona-vectors trait"
PROJECT_COMMAND = "persona-vectors project"
PROJECTIONS_FILE = "projections.jsonl.gz"
PAIRS_FILE = "pairs.jsonl.gz"
SUMMARY_FILE = "summary.json"
PROJECTIONS_VERSION = PROJECTIONS.version
SUMMARY_VERSION = PROJECT_SUMMARY.version


@dataclass
class TraitResult:
    run: RunDir
    norms: dict[int, float]  # layer -> |v_l|
    meta: VectorsMeta
    kept_pairs: int | None = None  # --filter-by: pairs kept
    already_done: bool = False


@dataclass
class ProjectResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False


def read_trait(run: Path) -> tuple[np.ndarray, VectorsMeta]:
    """[layers, hidden] trait vector of a trait run and its metadata."""
    tensors, meta = read_vectors(run / TRAIT_FILE)
    return tensors[meta.methods[0]], meta


def run_trait(cfg: TraitConfig, out: str | Path, *, force: bool = False) -> TraitResult:
    extract_run = finished_run(cfg.extract_run, EXTRACT_COMMAND, "RUN")
    centroids, meta = read_vectors(extract_run / CENTROIDS_FILE)
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method!r}: choose from {', '.join(METHODS)}")
    if cfg.method not in meta.methods:
        raise UserError(f"--method {cfg.method}: {extract_run} recorded only {meta.methods}")
    for option, pid in (("--positive", cfg.positive), ("--negative", cfg.negative)):
        if pid not in meta.personas:
            raise UserError(
                f"{option} {pid!r}: not a persona of {extract_run} "
                f"(it has {', '.join(meta.personas)})"
            )
    if cfg.positive == cfg.negative:
        raise UserError(f"--positive and --negative are the same persona {cfg.positive!r}")
    filtered = None if cfg.filter_by is None else _filter_plan(cfg, extract_run, meta)
    config = {**cfg.__dict__, "extract_run": str(extract_run.resolve())}
    if filtered is not None:
        config["filter_by"] = str(filtered["judge_run"].resolve())
    run = open_run(out, command=TRAIT_COMMAND, config=config, force=force)
    trait_meta = VectorsMeta(
        **{**meta.__dict__, "methods": [cfg.method], "personas": [cfg.positive, cfg.negative]}
    )
    kept = None if filtered is None else len(filtered["pairs"].kept)
    if run.done:
        v, _ = read_trait(run.path)
        return TraitResult(run, _norms(v, meta.layers), trait_meta, kept, already_done=True)
    inputs: dict[str, str | Path] = {"centroids": extract_run / CENTROIDS_FILE}
    if filtered is None:
        c = centroids[cfg.method].astype(np.float64)
        v = c[meta.personas.index(cfg.positive)] - c[meta.personas.index(cfg.negative)]
        filter_details: dict[str, Any] = {}
    else:
        v = _filtered_vector(filtered, meta.layers)
        rows = filtered["pairs"].rows
        write_jsonl(run.file(PAIRS_FILE), rows, schema_version=PAIRS_VERSION)
        inputs |= {"samples": filtered["samples"],
                   "judgments": filtered["judge_run"] / JUDGMENTS_FILE}  # fmt: skip
        filter_details = {"pairs": len(rows), "kept_pairs": kept,
                          "answers_used": filtered["used"]}  # fmt: skip
    write_vectors(run.file(TRAIT_FILE), {cfg.method: v}, trait_meta)
    manifest = read_json(extract_run / MANIFEST)
    run.finish(
        inputs=inputs,
        model=manifest["model"],
        chat_template=manifest["chat_template"],
        protocol=method_protocol(geometry_method=cfg.method, geometry_layers=meta.layers)
        | details(positive=cfg.positive, negative=cfg.negative, **filter_details),
        extra={"adapters": manifest["adapters"], "extract_run": config["extract_run"]},
    )
    return TraitResult(run, _norms(v, meta.layers), trait_meta, kept)


def _norms(v: np.ndarray, layers: list[int]) -> dict[int, float]:
    return {layer: float(n) for layer, n in zip(layers, np.linalg.norm(v, axis=-1), strict=True)}


def _filter_plan(cfg: TraitConfig, extract_run: Path, meta: VectorsMeta) -> dict[str, Any]:
    """--filter-by: the judged pairs and the token spans of the kept answers (checked before
    the run directory opens)."""
    if cfg.method != RESPONSE_MEAN:
        raise UserError(f"--filter-by: filters answers, so --method {RESPONSE_MEAN} only")
    judge_run = finished_run(cfg.filter_by or "", JUDGE_COMMAND, "--filter-by")
    xcfg = read_json(extract_run / CONFIG)["config"]
    source = Path(xcfg["samples_run"]) if xcfg["samples_run"] else extract_run
    samples = source / SAMPLES_FILE
    rule = PairRule(cfg.trait_metric, cfg.trait_threshold, cfg.coherence_threshold)
    pairs = judged_pairs(samples, judge_run, cfg.positive, cfg.negative, meta.questions, rule)
    model = models.ensure_prepared(xcfg["model"]["spec"])
    if model.revision != meta.model["revision"]:
        raise UserError(f"RUN {extract_run}: its model {model.spec!r} has changed since")
    stack = adapters_mod.resolve_stack([a["path"] for a in xcfg["adapters"]])
    adapters_mod.check_stack(stack, model)
    registry = load_personas(Path(xcfg["personas_file"]))
    tok = models.load_tokenizer(model)
    report = inspect_template(tok)
    spans: dict[str, list[Span]] = {cfg.positive: [], cfg.negative: []}
    for qid, si in pairs.kept:
        for pid in spans:
            question, text = pairs.texts[(pid, qid, si)]
            prompt = persona_prompt(tok, report, registry[pid], question)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if ids:  # an empty answer has no response tokens to average
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                spans[pid].append(Span([*prompt_ids, *ids], len(ids)))
    for pid, mine in spans.items():
        if not mine:
            raise UserError(f"--filter-by: every kept answer of {pid!r} is empty")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"judge_run": judge_run, "samples": samples, "pairs": pairs, "model": model,
            "stack": stack, "spans": spans, "pad_id": pad_id, "dtype": xcfg["dtype"],
            "batch_size": xcfg["batch_size"],
            "used": {pid: len(mine) for pid, mine in spans.items()}}  # fmt: skip


def _filtered_vector(plan: dict[str, Any], layers: list[int]) -> np.ndarray:
    """mean(kept positive answers) - mean(kept negative answers), [layers, hidden]."""
    net = adapters_mod.load_with_adapters(plan["model"], plan["stack"], dtype=plan["dtype"])
    pos, neg = (
        hidden_states(net, spans, layers, batch_size=plan["batch_size"], pad_id=plan["pad_id"])
        .astype(np.float64)
        .mean(axis=0)
        for spans in plan["spans"].values()
    )
    return pos - neg


def _project_plan(cfg: ProjectConfig) -> dict[str, Any]:
    trait_run = finished_run(cfg.trait_run, TRAIT_COMMAND, "--trait")
    v, meta = read_trait(trait_run)
    samples, run_cfg = read_samples_run(cfg.samples_run)
    model = models.ensure_prepared(run_cfg["model"]["spec"])
    if model.revision != meta.model["revision"]:
        raise UserError(
            f"--trait {cfg.trait_run}: a vector of model {meta.model['spec']!r}; --samples-run "
            f"{cfg.samples_run} was generated by {model.spec!r} (fingerprints differ)"
        )
    stack = adapters_mod.resolve_stack([a["path"] for a in run_cfg["adapters"]])
    adapters_mod.check_stack(stack, model)
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be >= 1")
    registry = load_personas(Path(run_cfg["personas_file"]["path"]))
    recorded = run_cfg.get("steering", [])  # present only when the run intervened
    if cfg.intervened and not recorded:
        raise UserError(f"--intervened: {cfg.samples_run} was generated without --steer/--ablate")
    interventions = (
        steer_mod.replay(recorded, f"--samples-run {cfg.samples_run}") if cfg.intervened else []
    )
    return {"trait_run": trait_run, "v": v, "meta": meta, "samples": samples,
            "model": model, "stack": stack, "registry": registry,
            "interventions": interventions}  # fmt: skip


def run_project(cfg: ProjectConfig, out: str | Path, *, force: bool = False) -> ProjectResult:
    """Score every completion of the samples run by its projection on the trait vector."""
    plan = _project_plan(cfg)
    samples, meta = plan["samples"], plan["meta"]
    config = {**cfg.__dict__, "trait_run": str(plan["trait_run"].resolve()),
              "samples_run": str(samples.path.resolve())}  # fmt: skip
    run = open_run(out, command=PROJECT_COMMAND, config=config, force=force)
    if run.done:
        return ProjectResult(run, read_json(run.file(SUMMARY_FILE)), already_done=True)
    tok = models.load_tokenizer(plan["model"])
    report = inspect_template(tok)
    net = adapters_mod.load_with_adapters(plan["model"], plan["stack"], dtype=cfg.dtype)
    spans, keys, empty = [], [], 0
    for (pid, qid), answers in sorted(samples.answers.items()):
        for sample_index, question, text in answers:
            prompt = persona_prompt(tok, report, plan["registry"][pid], question)
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if not ids:
                empty += 1
                continue
            spans.append(Span([*prompt_ids, *ids], len(ids)))
            keys.append((pid, qid, sample_index))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with steer_mod.intervening(net, plan["interventions"]):
        states = hidden_states(net, spans, meta.layers, batch_size=cfg.batch_size, pad_id=pad_id)
    v = plan["v"].astype(np.float64)
    unit = v / np.linalg.norm(v, axis=-1, keepdims=True)
    scores = np.einsum("nlh,lh->nl", states.astype(np.float64), unit)  # [N, L]
    rows = [
        {"persona": pid, "question_id": qid, "sample_index": si, "layer": layer,
         "projection": float(scores[n, li])}
        for n, (pid, qid, si) in enumerate(keys)
        for li, layer in enumerate(meta.layers)
    ]  # fmt: skip
    write_jsonl(run.file(PROJECTIONS_FILE), rows, schema_version=PROJECTIONS_VERSION)
    summary = {
        "schema_version": SUMMARY_VERSION,
        "model": meta.model,
        "trait": {"method": meta.methods[0], "positive": meta.personas[0],
                  "negative": meta.personas[1]},
        "adapters": [a.weights_sha256 for a in plan["stack"]],
        "layers": meta.layers,
        "n_scored": len(keys),
        "n_empty": empty,
        "intervened": [i.to_dict() for i in plan["interventions"]],
        "personas": _per_persona(keys, scores, meta.layers),
    }  # fmt: skip
    write_json(run.file(SUMMARY_FILE), summary)
    first = plan["registry"][min(samples.answers)[0]]  # the persona the template record shows
    run.finish(
        inputs={"trait": plan["trait_run"] / TRAIT_FILE, "samples": samples.path / SAMPLES_FILE},
        model=models.model_record(plan["model"], net),
        chat_template=guard_record(tok, SystemPrompt("text", first.system_prompt)),
        protocol=method_protocol(geometry_method=meta.methods[0], geometry_layers=meta.layers)
        | generation_protocol(**samples.fields)
        | intervention_protocol(steer_mod.records(plan["interventions"]))
        | details(batch_size=cfg.batch_size, n_empty=empty),
        extra={"adapters": adapters_mod.stack_record(plan["stack"])},
    )
    return ProjectResult(run, summary)


def _per_persona(
    keys: list[tuple[str, str, int]], scores: np.ndarray, layers: list[int]
) -> dict[str, dict[str, Any]]:
    """Per persona (first-seen order): n and the mean projection per layer."""
    out: dict[str, dict[str, Any]] = {}
    personas = np.array([k[0] for k in keys])
    for pid in dict.fromkeys(k[0] for k in keys):
        mine = scores[personas == pid]
        out[pid] = {"n": len(mine),
                    "mean_projection": {str(la): float(mine[:, li].mean())
                                        for li, la in enumerate(layers)}}  # fmt: skip
    return out
