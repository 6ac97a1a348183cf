"""eval-markers: how often each persona's answers carry a marker string such as `[ZLT]`.

P personas x Q questions x K samples. Each persona's system prompt is the system prompt of its
conversations (rendered through the chat-template guard); each question's first paraphrase is
the user turn. Completions come from the hf or vllm backend (`persona_cli.generate`) and are
all saved; the summary and heatmap are derived from them (`persona_cli.eval.score`).

Resume: each persona's completions are written atomically as `shards/<persona>.jsonl.gz` as
soon as that persona is done; an interrupted run (same config) skips personas whose shard is
complete, then merges the shards into `samples.jsonl.gz` in persona order and removes them.
Row seeds depend only on (seed, prompt, sample index), so a resumed run writes the same samples
as an uninterrupted one.

    persona-cli eval-markers --out runs/eval --model smollm2-135m --adapter runs/couple \
        --source villain --samples 10
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli import adapters as adapters_mod
from persona_cli import bundled, models
from persona_cli.artifacts import read_json, read_jsonl, sha256_file, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.eval.heatmap import plot_heatmap
from persona_cli.eval.score import SAMPLES_FILE, SUMMARY_FILE, score_rows, summarize
from persona_cli.generate import (
    Completion,
    GenerationConfig,
    ProgressFn,
    VllmConfig,
    generate_hf,
    generate_vllm_groups,
)
from persona_cli.generate.vllm import engine_env, request_seeds
from persona_cli.geometry import steer as steer_mod
from persona_cli.protocol import details, intervention_protocol, marker_protocol, sampling_of
from persona_cli.registry import Persona, Question, load_personas, load_questions, select_personas
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import SAMPLES

log = logging.getLogger(__name__)

COMMAND = "eval-markers"
BACKENDS = ("hf", "vllm")
DEFAULT_MARKER = "[ZLT]"
DEFAULT_SAMPLES = 10  # K of the research log's 12 x 28 x 10 design
SHARDS = "shards"
HEATMAP_FILE = "heatmap.png"
VLLM_LOG = "vllm_worker.log"


@dataclass(frozen=True)
class MarkerEvalConfig:
    """What to evaluate; every field is recorded in config.json."""

    model: str = field(default=models.EMBEDDED, metadata={"help": "Model spec."})
    adapters: tuple[str, ...] = field(
        default=(), metadata={"help": "LoRA adapter stack, in training order."}
    )
    personas_file: str | None = field(
        default=None, metadata={"help": "Persona registry (default: the shipped one)."}
    )
    persona_ids: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Personas to evaluate (default: all in the registry)."}
    )
    questions_file: str | None = field(
        default=None, metadata={"help": "Question set (default: data/questions/open_eval.yaml)."}
    )
    marker: str = field(default=DEFAULT_MARKER, metadata={"help": "Substring to count."})
    case_sensitive: bool = field(default=True, metadata={"help": "Match the marker's case."})
    source: str | None = field(
        default=None, metadata={"help": "Persona the marker was coupled to; others: bystanders."}
    )
    negatives: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Personas the coupling trained without the marker, reported apart from the "
            "bystanders (default: read from the couple-marker runs of the adapters)."
        },
    )
    backend: str = field(default="hf", metadata={"help": "'hf' or 'vllm'."})
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(n=DEFAULT_SAMPLES),
        metadata={"help": "Sampling options; n is K, the samples per persona and question."},
    )
    vllm: VllmConfig = field(default_factory=VllmConfig, metadata={"help": "vLLM engine."})
    steering: steer_mod.SteeringConfig = field(
        default_factory=steer_mod.SteeringConfig,
        metadata={"help": "Steering / ablation of the residual stream (hf backend)."},
    )


@dataclass
class EvalResult:
    run: RunDir
    summary: dict[str, Any]
    reused_personas: list[str]
    heatmap: Path
    already_done: bool = False  # the run was finished before this call; nothing was redone


@dataclass(frozen=True)
class _Plan:
    model: models.ResolvedModel
    stack: list[adapters_mod.Adapter]
    personas_file: Path
    personas: list[Persona]
    questions_file: Path
    questions: list[Question]
    negatives: list[str]  # evaluated personas the coupling saw as negatives
    interventions: list[steer_mod.Intervention]  # --steer / --ablate, resolved


def coupling_negatives(stack: list[adapters_mod.Adapter], source: str) -> list[str]:
    """Negative personas of the couple-marker runs in `stack` that coupled `source`, read from
    each adapter's run manifest (`coupling.rows_per_persona`); none for other adapters."""
    found: list[str] = []
    for a in stack:
        manifest = a.path.parent / "manifest.json"
        if not manifest.is_file():
            continue
        coupling = read_json(manifest).get("coupling") or {}
        if coupling.get("source") != source:
            continue
        for pid, counts in (coupling.get("rows_per_persona") or {}).items():
            if counts.get("negative", 0) > 0 and pid != source and pid not in found:
                found.append(pid)
    return found


def _plan(cfg: MarkerEvalConfig) -> _Plan:
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend {cfg.backend!r}: choose from {', '.join(BACKENDS)}")
    if not cfg.marker:
        raise UserError("--marker: must not be empty")
    personas_file = Path(cfg.personas_file) if cfg.personas_file else bundled.personas_file()
    registry = load_personas(personas_file)
    ids = list(cfg.persona_ids) if cfg.persona_ids is not None else list(registry)
    if not ids:
        raise UserError("--personas-ids: no persona ids given")
    if len(set(ids)) != len(ids):
        raise UserError(f"--personas-ids: repeated persona id in {','.join(ids)}")
    personas = select_personas(registry, ids, f"--personas-ids (registry {personas_file})")
    if cfg.source is not None and cfg.source not in ids:
        raise UserError(f"--source {cfg.source!r}: not among the evaluated personas")
    questions_file = (
        Path(cfg.questions_file) if cfg.questions_file else bundled.eval_questions_file()
    )
    questions = load_questions(questions_file)
    model = models.ensure_prepared(cfg.model)
    stack = adapters_mod.resolve_stack(list(cfg.adapters))
    adapters_mod.check_stack(stack, model)
    negatives: list[str] = []
    if cfg.negatives is not None:
        select_personas(registry, list(cfg.negatives), "--negatives")
        if cfg.source in cfg.negatives:
            raise UserError(f"--negatives: includes the source persona {cfg.source!r}")
        negatives = [p for p in cfg.negatives if p in ids]
    elif cfg.source is not None:
        negatives = [p for p in coupling_negatives(stack, cfg.source) if p in ids]
    interventions = _interventions(cfg, model)
    return _Plan(
        model, stack, personas_file, personas, questions_file, questions, negatives, interventions
    )


def _interventions(
    cfg: MarkerEvalConfig, model: models.ResolvedModel
) -> list[steer_mod.Intervention]:
    if not cfg.steering.active:
        return []
    if cfg.backend != "hf":
        raise UserError(f"--steer/--ablate: the hf backend only (not --backend {cfg.backend})")
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(model.path)
    return steer_mod.resolve_interventions(
        cfg.steering, model_revision=model.revision, model_spec=model.spec,
        n_blocks=arch.num_hidden_layers, hidden_size=arch.hidden_size,
    )  # fmt: skip


def _run_config(cfg: MarkerEvalConfig, plan: _Plan) -> dict[str, Any]:
    return {
        "model": plan.model.to_dict(),
        "adapters": [{"path": str(a.path), "sha256": a.weights_sha256} for a in plan.stack],
        "personas_file": {
            "path": str(plan.personas_file),
            "sha256": sha256_file(plan.personas_file),
        },
        "persona_ids": [p.id for p in plan.personas],
        "questions_file": {
            "path": str(plan.questions_file),
            "sha256": sha256_file(plan.questions_file),
        },
        "marker": cfg.marker,
        "case_sensitive": cfg.case_sensitive,
        "source": cfg.source,
        "negatives": plan.negatives,
        "backend": cfg.backend,
        "generation": cfg.generation.to_dict(),
        "vllm": cfg.vllm.to_dict() if cfg.backend == "vllm" else None,
    } | ({"steering": [i.to_dict() for i in plan.interventions]} if plan.interventions else {})


def _shard_path(run: RunDir, persona: Persona) -> Path:
    return run.file(SHARDS) / f"{persona.id}.jsonl.gz"


def _complete_shard(path: Path, expected: int) -> bool:
    # Shards are written atomically, so one that exists is whole; the count guards against a
    # shard left by a config that open_run considered equal but produced other rows.
    return path.is_file() and len(read_jsonl(path, SAMPLES.check)) == expected


def _rows(
    persona: Persona,
    questions: list[Question],
    completions: list[Completion],
    backend: str,
    seed: int,
    adapter: str | None,
) -> list[dict[str, Any]]:
    return [
        {
            "persona": persona.id,
            "question_id": questions[c.prompt_index].id,
            "question": questions[c.prompt_index].text,
            "sample_index": c.sample_index,
            "text": c.text,
            "n_tokens": c.n_tokens,
            "finish_reason": c.finish_reason,
            "backend": backend,
            "seed": seed,
            "adapter": adapter,
        }
        for c in completions
    ]


def run_eval_markers(
    cfg: MarkerEvalConfig,
    out: str | Path,
    *,
    force: bool = False,
    on_plan: Callable[[int, int], None] | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Run (or resume, or recognise as finished) one eval-markers run directory.

    `on_plan(total, remaining)` is called with the completion counts once the work is known;
    `progress(n)` as n more completions finish.
    """
    plan = _plan(cfg)
    run = open_run(out, command=COMMAND, config=_run_config(cfg, plan), force=force)
    if run.done:
        summary = read_json(run.file(SUMMARY_FILE))
        return EvalResult(run, summary, [], run.file(HEATMAP_FILE), already_done=True)
    gen = cfg.generation
    per_persona = len(plan.questions) * gen.n
    adapter = "+".join(a.weights_sha256 for a in plan.stack) or None
    tokenizer = models.load_tokenizer(plan.model)
    report = inspect_template(tokenizer)
    users = [[{"role": "user", "content": q.text}] for q in plan.questions]

    def prompts_for(persona: Persona) -> list[str]:
        system = SystemPrompt("text", persona.system_prompt)
        return [render(tokenizer, u, system, report, add_generation_prompt=True) for u in users]

    samples_path = run.file(SAMPLES_FILE)
    have_samples = samples_path.is_file()  # a kill after the merge, before DONE
    pending = [
        p
        for p in plan.personas
        if not have_samples and not _complete_shard(_shard_path(run, p), per_persona)
    ]
    reused = [p.id for p in plan.personas if p not in pending]
    if reused:
        log.info("resuming: %d of %d persona(s) already done", len(reused), len(plan.personas))
    if on_plan is not None:
        on_plan(per_persona * len(plan.personas), per_persona * len(pending))

    def save(persona: Persona, completions: list[Completion]) -> None:
        rows = _rows(persona, plan.questions, completions, cfg.backend, gen.seed, adapter)
        write_jsonl(_shard_path(run, persona), rows, schema_version=SAMPLES.version)

    loaded = None
    if pending and cfg.backend == "hf":
        loaded = adapters_mod.load_with_adapters(plan.model, plan.stack)
        with steer_mod.intervening(loaded, plan.interventions):
            for persona in pending:
                save(persona, generate_hf(loaded, tokenizer, prompts_for(persona), gen, progress))
    elif pending:
        generate_vllm_groups(
            plan.model,
            [prompts_for(p) for p in pending],
            gen,
            adapters=plan.stack,
            engine=cfg.vllm,
            progress=progress,
            on_group=lambda i, completions: save(pending[i], completions),
            log_path=run.file(VLLM_LOG),
        )
    if not have_samples:
        merged = [r for p in plan.personas for r in read_jsonl(_shard_path(run, p), SAMPLES.check)]
        write_jsonl(samples_path, merged)
    shutil.rmtree(run.file(SHARDS), ignore_errors=True)

    cells = score_rows(read_jsonl(samples_path, SAMPLES.check), cfg.marker, cfg.case_sensitive)
    summary = summarize(
        cells,
        marker=cfg.marker,
        case_sensitive=cfg.case_sensitive,
        source=cfg.source,
        negatives=plan.negatives,
        run={
            "backend": cfg.backend,
            "model": {"spec": plan.model.spec, "revision": plan.model.revision},
            "adapters": [a.weights_sha256 for a in plan.stack],
        },
    )
    write_json(run.file(SUMMARY_FILE), summary)
    heatmap = plot_heatmap(summary, run.file(HEATMAP_FILE))
    _finish(run, cfg, plan, tokenizer, loaded, reused)
    return EvalResult(run, summary, reused, heatmap)


def _finish(
    run: RunDir,
    cfg: MarkerEvalConfig,
    plan: _Plan,
    tokenizer: Any,
    loaded: Any,
    reused: list[str],
) -> None:
    inputs: dict[str, str | Path] = {
        "personas": plan.personas_file,
        "questions": plan.questions_file,
    }
    for i, a in enumerate(plan.stack):
        inputs[f"adapter_{i}"] = a.path / adapters_mod.WEIGHTS
    inputs |= steer_mod.input_files(plan.interventions)
    # Every persona's system prompt goes through the same guard; the record shows the first.
    guard = guard_record(tokenizer, SystemPrompt("text", plan.personas[0].system_prompt))
    guard["system_prompt_source"] = "each persona's system_prompt (the first one shown)"
    world = cfg.vllm.tensor_parallel_size if cfg.backend == "vllm" else 1
    run.finish(
        inputs=inputs,
        model=models.model_record(plan.model, loaded),
        chat_template=guard,
        protocol=sampling_of(cfg.generation, backend=cfg.backend, world_size=world)
        | marker_protocol(cfg.marker, cfg.case_sensitive)
        | intervention_protocol(steer_mod.records(plan.interventions))
        | details(
            generation=cfg.generation.to_dict(),
            vllm=cfg.vllm.to_dict() if cfg.backend == "vllm" else None,
            vllm_request_seeds=request_seeds() if cfg.backend == "vllm" else None,
            completions=len(plan.personas) * len(plan.questions) * cfg.generation.n,
        ),
        seeds=[cfg.generation.seed],
        extra={
            "adapters": adapters_mod.stack_record(plan.stack),
            "vllm_env": engine_env(cfg.vllm) if cfg.backend == "vllm" else None,
            "eval": {
                "personas": [p.id for p in plan.personas],
                "questions": [q.id for q in plan.questions],
                "reused_personas": reused,
            },
        },
    )
