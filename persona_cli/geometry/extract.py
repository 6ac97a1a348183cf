"""persona-vectors extract: one centroid per persona and layer, by two methods.

For P personas x Q questions, each persona's system prompt and each question's first
paraphrase are rendered through the chat-template guard with the assistant header
(`add_generation_prompt=True`).
- `prompt-last`: the hidden state at the last prompt token; no generation.
- `response-mean`: the mean hidden state over the tokens of each answer (the answer text
  tokenized on its own and appended to the prompt's ids), averaged over the K answers of the
  (persona, question). Answers are generated here (hf backend, `GenerationConfig`) and saved as
  `samples.jsonl.gz`, or read from an eval-markers run (`samples_run`), so the vectors describe
  exactly the completions that were scored there; an answer with no tokens is left out of its
  mean, and a (persona, question) with no tokens in any answer is an error.
A persona's centroid is the mean of its Q per-question vectors (`persona_cli.geometry.vectors`).

Artifacts: centroids.safetensors, question_vectors.safetensors, rows.jsonl.gz (one row per
persona, question and method: token counts and the per-layer vector norms), summary.json, and
samples.jsonl.gz when answers were generated here. Every file is written atomically and DONE
last; an interrupted run re-extracts (the forward passes are cheap) but reuses answers it had
already generated and saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli import adapters as adapters_mod
from persona_cli import bundled, models
from persona_cli.artifacts import read_json, read_jsonl, sha256_json, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.generate import generate_hf
from persona_cli.geometry.config import ExtractConfig
from persona_cli.geometry.hidden import (
    PROMPT_LAST,
    RESPONSE_MEAN,
    Span,
    hidden_states,
    methods_of,
    parse_layers,
)
from persona_cli.geometry.vectors import (
    CENTROIDS_FILE,
    QUESTION_VECTORS_FILE,
    VectorsMeta,
    write_vectors,
)
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.protocol import (
    RunProtocol,
    details,
    generation_protocol,
    method_protocol,
    recorded_fields,
    sampling_of,
)
from persona_cli.registry import Persona, Question, load_personas, load_questions, select_personas
from persona_cli.rundir import RunDir, is_done, open_run
from persona_cli.schemas import CENTROID_ROWS, CONFIG, EXTRACT_SUMMARY, MANIFEST, SAMPLES

COMMAND = "persona-vectors extract"
ROWS_FILE = "rows.jsonl.gz"
SAMPLES_FILE = "samples.jsonl.gz"
SUMMARY_FILE = "summary.json"
ROWS_VERSION = CENTROID_ROWS.version
SUMMARY_VERSION = EXTRACT_SUMMARY.version

# stage label, total units; then the number of units just finished


@dataclass
class ExtractResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False


@dataclass(frozen=True)
class SamplesRun:
    """A finished eval-markers run's answers, ordered by sample index."""

    path: Path
    # (persona, qid) -> [(sample_index, question, text)]
    answers: dict[tuple[str, str], list[tuple[int, str, str]]]
    fields: dict[str, Any]  # its guarded sampling fields


@dataclass(frozen=True)
class _Plan:
    methods: tuple[str, ...]
    layers: list[int]
    model: models.ResolvedModel
    stack: list[adapters_mod.Adapter]
    personas_file: Path
    personas: list[Persona]
    questions_file: Path
    questions: list[Question]
    samples: SamplesRun | None


def read_samples_run(spec: str, option: str = "--samples-run") -> tuple[SamplesRun, dict[str, Any]]:
    """The answers and guarded sampling fields of an eval-markers run, and its config."""
    path = Path(spec)
    if not is_done(path) or not (path / SAMPLES_FILE).is_file():
        raise UserError(f"{option} {spec}: not a finished eval-markers run (no DONE or samples)")
    manifest, config = read_json(path / MANIFEST), read_json(path / CONFIG)
    answers: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for row in read_jsonl(path / SAMPLES_FILE, SAMPLES.check):
        key = (row["persona"], row["question_id"])
        answers.setdefault(key, []).append((row["sample_index"], row["question"], row["text"]))
    ordered = {k: sorted(v) for k, v in answers.items()}
    fields = recorded_fields(manifest, path / MANIFEST, config)
    keep = ("backend", "temperature", "top_p", "max_new_tokens", "samples_per_prompt")
    return SamplesRun(path, ordered, {k: fields[k] for k in keep if k in fields}), config["config"]


def _plan(cfg: ExtractConfig) -> _Plan:
    methods = methods_of(cfg.method)
    samples, run_cfg = (None, {}) if cfg.samples_run is None else read_samples_run(cfg.samples_run)
    if cfg.samples_run is not None and RESPONSE_MEAN not in methods:
        raise UserError("--samples-run: only response-mean reads answers; pass --method both")
    personas_file = Path(
        cfg.personas_file or run_cfg.get("personas_file", {}).get("path") or bundled.personas_file()
    )
    registry = load_personas(personas_file)
    ids = list(cfg.persona_ids) if cfg.persona_ids is not None else list(registry)
    if len(set(ids)) != len(ids) or not ids:
        raise UserError(f"--persona-ids {','.join(ids)!r}: empty or repeated persona id")
    personas = select_personas(registry, ids, f"--persona-ids (registry {personas_file})")
    questions_file = Path(
        cfg.questions_file
        or run_cfg.get("questions_file", {}).get("path")
        or bundled.eval_questions_file()
    )
    if cfg.limit_questions is not None and cfg.limit_questions < 1:
        raise UserError(f"--limit-questions {cfg.limit_questions}: must be >= 1")
    questions = load_questions(questions_file)[: cfg.limit_questions]
    spec = cfg.model or (run_cfg["model"]["spec"] if samples else models.EMBEDDED)
    model = models.ensure_prepared(spec)
    adapter_paths = (
        list(cfg.adapters)
        if cfg.adapters is not None
        else [a["path"] for a in run_cfg.get("adapters", [])]
    )
    stack = adapters_mod.resolve_stack(adapter_paths)
    adapters_mod.check_stack(stack, model)
    if samples is not None:
        _check_samples_match(samples, run_cfg, model, stack, personas, questions)
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(model.path).num_hidden_layers
    layers = parse_layers(cfg.layers, n_layers)
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be >= 1")
    return _Plan(
        methods, layers, model, stack, personas_file, personas, questions_file, questions, samples
    )


def _check_samples_match(
    samples: SamplesRun,
    run_cfg: dict[str, Any],
    model: models.ResolvedModel,
    stack: list[adapters_mod.Adapter],
    personas: list[Persona],
    questions: list[Question],
) -> None:
    where = f"--samples-run {samples.path}"
    if run_cfg["model"]["revision"] != model.revision:
        raise UserError(
            f"{where}: was generated by model {run_cfg['model']['spec']!r}, not {model.spec!r}"
        )
    if [a["sha256"] for a in run_cfg["adapters"]] != [a.weights_sha256 for a in stack]:
        raise UserError(f"{where}: was generated with another --adapter stack")
    for p in personas:
        for q in questions:
            if (p.id, q.id) not in samples.answers:
                raise UserError(f"{where}: has no samples of persona {p.id!r} on question {q.id!r}")


def _run_config(cfg: ExtractConfig, plan: _Plan) -> dict[str, Any]:
    return {
        "model": plan.model.to_dict(),
        "adapters": [{"path": str(a.path), "sha256": a.weights_sha256} for a in plan.stack],
        "personas_file": str(plan.personas_file),
        "persona_ids": [p.id for p in plan.personas],
        "questions_file": str(plan.questions_file),
        "question_ids": [q.id for q in plan.questions],
        "layers": plan.layers,
        "methods": list(plan.methods),
        "samples_run": str(plan.samples.path) if plan.samples else None,
        "generation": cfg.generation.to_dict() if _generates(plan) else None,
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
    }


def _generates(plan: _Plan) -> bool:
    return RESPONSE_MEAN in plan.methods and plan.samples is None


def _answers(
    plan: _Plan,
    run: RunDir,
    cfg: ExtractConfig,
    net: Any,
    tok: Any,
    prompts: list[str],
    progress: Progress,
) -> dict[tuple[str, str], list[str]]:
    """(persona, question id) -> answer texts: the samples run's, or generated and saved."""
    if plan.samples is not None:
        return {k: [t for _, _, t in v] for k, v in plan.samples.answers.items()}
    path = run.file(SAMPLES_FILE)
    if not path.is_file():  # an earlier attempt of this run may have saved them already
        gen = cfg.generation
        progress.begin("generating", len(prompts) * gen.n, unit="completions")
        completions = generate_hf(
            net, tok, prompts, gen, lambda n: progress.advance("generating", n)
        )
        adapter = "+".join(a.weights_sha256 for a in plan.stack) or None
        cells = [(p, q) for p in plan.personas for q in plan.questions]
        rows = [
            {
                "persona": cells[c.prompt_index][0].id,
                "question_id": cells[c.prompt_index][1].id,
                "question": cells[c.prompt_index][1].text,
                "sample_index": c.sample_index,
                "text": c.text,
                "n_tokens": c.n_tokens,
                "finish_reason": c.finish_reason,
                "backend": "hf",
                "seed": gen.seed,
                "adapter": adapter,
            }
            for c in completions
        ]
        write_jsonl(path, rows, schema_version=SAMPLES.version)
    answers: dict[tuple[str, str], list[str]] = {}
    for row in read_jsonl(path, SAMPLES.check):
        answers.setdefault((row["persona"], row["question_id"]), []).append(row["text"])
    return answers


def _user_text(plan: _Plan, persona: Persona, question: Question) -> str:
    """The exact user turn: the samples run's (what was scored), else the first paraphrase."""
    if plan.samples is not None:
        return plan.samples.answers[(persona.id, question.id)][0][1]
    return question.text


def persona_prompt(tok: Any, report: Any, persona: Persona, user_text: str) -> str:
    """One user turn under a persona's system prompt, with the assistant header."""
    return render(
        tok,
        [{"role": "user", "content": user_text}],
        SystemPrompt("text", persona.system_prompt),
        report,
        add_generation_prompt=True,
    )


def run_extract(
    cfg: ExtractConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ExtractResult:
    """Run (or recognise as finished) one extract run directory; `progress` gets the tasks
    "prompt-last", "generating" and "response-mean" (sequences through the model)."""
    plan = _plan(cfg)
    run = open_run(out, command=COMMAND, config=_run_config(cfg, plan), force=force)
    if run.done:
        return ExtractResult(run, read_json(run.file(SUMMARY_FILE)), already_done=True)
    tok = models.load_tokenizer(plan.model)
    report = inspect_template(tok)
    net = adapters_mod.load_with_adapters(plan.model, plan.stack, dtype=cfg.dtype)
    cells = [(p, q) for p in plan.personas for q in plan.questions]
    prompts = [persona_prompt(tok, report, p, _user_text(plan, p, q)) for p, q in cells]
    prompt_ids = [tok(s, add_special_tokens=False)["input_ids"] for s in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    P, Q, L = len(plan.personas), len(plan.questions), len(plan.layers)
    vectors: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}  # method -> [P*Q, 2]: answers used, tokens averaged

    def forward(spans: list[Span], key: str) -> np.ndarray:
        progress.begin(key, len(spans), unit="sequences")
        return hidden_states(
            net,
            spans,
            plan.layers,
            batch_size=cfg.batch_size,
            pad_id=pad_id,
            progress=lambda n: progress.advance(key, n),
        )

    if PROMPT_LAST in plan.methods:
        vectors[PROMPT_LAST] = forward([Span(ids, 1) for ids in prompt_ids], PROMPT_LAST).reshape(
            P, Q, L, -1
        )
        counts[PROMPT_LAST] = np.array([[1, len(ids)] for ids in prompt_ids])
    if RESPONSE_MEAN in plan.methods:
        answers = _answers(plan, run, cfg, net, tok, prompts, progress)
        spans, owner = [], []
        for c, (p, q) in enumerate(cells):
            for text in answers[(p.id, q.id)]:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if ids:
                    spans.append(Span([*prompt_ids[c], *ids], len(ids)))
                    owner.append(c)
        states = forward(spans, RESPONSE_MEAN)
        owner_arr = np.array(owner, dtype=np.int64)
        per_cell = np.zeros((P * Q, L, states.shape[-1]), dtype=np.float64)
        tally = np.zeros((P * Q, 2), dtype=np.int64)
        for c in range(P * Q):
            mine = owner_arr == c
            if not mine.any():
                p, q = cells[c]
                raise UserError(f"persona {p.id!r}, question {q.id!r}: no answer has any tokens")
            per_cell[c] = states[mine].astype(np.float64).mean(axis=0)
            tally[c] = (int(mine.sum()), sum(spans[i].last for i in np.flatnonzero(mine)))
        vectors[RESPONSE_MEAN] = per_cell.astype(np.float32).reshape(P, Q, L, -1)
        counts[RESPONSE_MEAN] = tally
    meta = VectorsMeta(
        model={"spec": plan.model.spec, "revision": plan.model.revision},
        adapters=[a.weights_sha256 for a in plan.stack],
        methods=list(plan.methods),
        layers=plan.layers,
        personas=[p.id for p in plan.personas],
        questions=[q.id for q in plan.questions],
        question_set_sha256=sha256_json([[q.id, _user_text(plan, p, q)] for p, q in cells]),
        template_sha256=report.template_sha256,
    )
    centroids = {
        m: v.astype(np.float64).mean(axis=1).astype(np.float32) for m, v in vectors.items()
    }
    write_vectors(run.file(QUESTION_VECTORS_FILE), vectors, meta)
    write_vectors(run.file(CENTROIDS_FILE), centroids, meta)
    write_jsonl(
        run.file(ROWS_FILE), _rows(cells, vectors, counts, plan), schema_version=ROWS_VERSION
    )
    summary = {
        "schema_version": SUMMARY_VERSION,
        "model": meta.model,
        "adapters": meta.adapters,
        "methods": meta.methods,
        "layers": meta.layers,
        "personas": meta.personas,
        "questions": meta.questions,
        "n_conversations": P * Q,
        "counts": {
            m: {"sequences": int(c[:, 0].sum()), "tokens": int(c[:, 1].sum())}
            for m, c in counts.items()
        },
        "hidden_size": int(next(iter(vectors.values())).shape[-1]),
    }
    write_json(run.file(SUMMARY_FILE), summary)
    _finish(run, cfg, plan, tok, net)
    return ExtractResult(run, summary)


def _rows(
    cells: list[tuple[Persona, Question]],
    vectors: dict[str, np.ndarray],
    counts: dict[str, np.ndarray],
    plan: _Plan,
) -> list[dict[str, Any]]:
    rows = []
    for method, v in vectors.items():
        flat = v.reshape(len(cells), len(plan.layers), -1)
        norms = np.linalg.norm(flat.astype(np.float64), axis=-1)
        for c, (p, q) in enumerate(cells):
            rows.append(
                {
                    "persona": p.id,
                    "question_id": q.id,
                    "method": method,
                    "n_answers": int(counts[method][c, 0]),
                    "n_tokens": int(counts[method][c, 1]),
                    "layers": plan.layers,
                    "norms": [float(x) for x in norms[c]],
                }
            )
    return rows


def _protocol(cfg: ExtractConfig, plan: _Plan) -> RunProtocol:
    proto = method_protocol(geometry_method=cfg.method, geometry_layers=plan.layers)
    if _generates(plan):
        proto = proto | sampling_of(cfg.generation, backend="hf", world_size=1)
    elif plan.samples is not None:
        proto = proto | generation_protocol(**plan.samples.fields)
    return proto | details(
        batch_size=cfg.batch_size,
        question_ids=[q.id for q in plan.questions],
        samples_run=str(plan.samples.path) if plan.samples else None,
    )


def _finish(run: RunDir, cfg: ExtractConfig, plan: _Plan, tok: Any, net: Any) -> None:
    inputs: dict[str, str | Path] = {
        "personas": plan.personas_file,
        "questions": plan.questions_file,
    }
    if plan.samples is not None:
        inputs["samples"] = plan.samples.path / SAMPLES_FILE
    for i, a in enumerate(plan.stack):
        inputs[f"adapter_{i}"] = a.path / adapters_mod.WEIGHTS
    guard = guard_record(tok, SystemPrompt("text", plan.personas[0].system_prompt))
    guard["system_prompt_source"] = "each persona's system_prompt (the first one shown)"
    run.finish(
        inputs=inputs,
        model=models.model_record(plan.model, net),
        chat_template=guard,
        protocol=_protocol(cfg, plan),
        seeds=[cfg.generation.seed] if _generates(plan) else [],
        extra={"adapters": adapters_mod.stack_record(plan.stack)},
    )
