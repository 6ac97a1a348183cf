"""An eval-markers run directory being filled: shards, samples, summary, heatmap, manifest.

`start_run` opens (or resumes, or recognises as finished) one run directory and works out which
personas are still missing; `MarkerRun.save` writes one persona's completions as
`shards/<persona>.jsonl.gz` (atomically, as soon as they exist); `complete_run` merges the
shards into `samples.jsonl.gz` in persona order, scores them, writes the summary and heatmap and
finishes the manifest. The generation around them is `persona_cli.eval.markers`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_cli import adapters as adapters_mod
from persona_cli import models
from persona_cli.artifacts import read_json, read_jsonl, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record
from persona_cli.eval.heatmap import plot_heatmap
from persona_cli.eval.score import SAMPLES_FILE, SUMMARY_FILE, score_rows, summarize
from persona_cli.generate import Completion
from persona_cli.generate.vllm import engine_env, request_seeds
from persona_cli.geometry import steer as steer_mod
from persona_cli.protocol import details, intervention_protocol, marker_protocol, sampling_of
from persona_cli.registry import Persona, Question
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import SAMPLES

if TYPE_CHECKING:
    from persona_cli.eval.markers import EvalPlan, MarkerEvalConfig

log = logging.getLogger(__name__)

COMMAND = "eval-markers"
SHARDS = "shards"
HEATMAP_FILE = "heatmap.png"
VLLM_LOG = "vllm_worker.log"


@dataclass
class EvalResult:
    run: RunDir
    summary: dict[str, Any]
    reused_personas: list[str]
    heatmap: Path
    already_done: bool = False  # the run was finished before this call; nothing was redone


@dataclass(frozen=True)
class EvalJob:
    """One run directory of an evaluation: its config and where it goes."""

    cfg: MarkerEvalConfig
    out: Path


def shard_path(run: RunDir, persona: Persona) -> Path:
    return run.file(SHARDS) / f"{persona.id}.jsonl.gz"


def complete_shard(path: Path, expected: int) -> bool:
    # Shards are written atomically, so one that exists is whole; the count guards against a
    # shard left by a config that open_run considered equal but produced other rows.
    return path.is_file() and len(read_jsonl(path, SAMPLES.check)) == expected


def sample_rows(
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


@dataclass
class MarkerRun:
    """A run being worked on: what is left and where each persona's shard goes."""

    job: EvalJob
    plan: EvalPlan
    run: RunDir
    pending: list[Persona]
    reused: list[str]
    have_samples: bool

    @property
    def stack_key(self) -> tuple[str, ...]:
        return tuple(a.weights_sha256 for a in self.plan.stack)

    def save(self, persona: Persona, completions: list[Completion]) -> None:
        cfg = self.job.cfg
        adapter = "+".join(self.stack_key) or None
        rows = sample_rows(
            persona, self.plan.questions, completions, cfg.backend, cfg.generation.seed, adapter
        )
        write_jsonl(shard_path(self.run, persona), rows, schema_version=SAMPLES.version)


def start_run(
    job: EvalJob, plan: EvalPlan, config: dict[str, Any], force: bool
) -> MarkerRun | EvalResult:
    """Open `job.out` with its `config` record; what is left to generate, or the finished run."""
    run = open_run(job.out, command=COMMAND, config=config, force=force)
    if run.done:
        summary = read_json(run.file(SUMMARY_FILE))
        return EvalResult(run, summary, [], run.file(HEATMAP_FILE), already_done=True)
    per_persona = len(plan.questions) * job.cfg.generation.n
    have_samples = run.file(SAMPLES_FILE).is_file()  # a kill after the merge, before DONE
    pending = [
        p
        for p in plan.personas
        if not have_samples and not complete_shard(shard_path(run, p), per_persona)
    ]
    reused = [p.id for p in plan.personas if p not in pending]
    if reused:
        log.info(
            "%s: resuming, %d of %d persona(s) already done",
            run.path,
            len(reused),
            len(plan.personas),
        )
    return MarkerRun(job, plan, run, pending, reused, have_samples)


def complete_run(r: MarkerRun, tokenizer: Any, loaded: Any) -> EvalResult:
    """Merge the shards, score, write the summary and heatmap, finish the manifest."""
    cfg, plan, run = r.job.cfg, r.plan, r.run
    samples_path = run.file(SAMPLES_FILE)
    if not r.have_samples:
        merged = [x for p in plan.personas for x in read_jsonl(shard_path(run, p), SAMPLES.check)]
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
    _finish(run, cfg, plan, tokenizer, loaded, r.reused)
    return EvalResult(run, summary, r.reused, heatmap)


def _finish(
    run: RunDir,
    cfg: MarkerEvalConfig,
    plan: EvalPlan,
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
