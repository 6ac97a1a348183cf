"""eval-markers: how often each persona's answers carry a marker string such as `[ZLT]`.

P personas x Q questions x K samples. Each persona's system prompt is the system prompt of its
conversations (rendered through the chat-template guard); each question's first paraphrase is
the user turn. Completions come from the hf or vllm backend (`persona_cli.generate`) and are
all saved; the summary and heatmap are derived from them (`persona_cli.eval.score`).

On the hf backend the personas' prompts share batches (`generate_hf_groups`: waves of a few
batches' worth of rows), rather than one `generate` call per persona.

Resume: each persona's completions are written atomically as `shards/<persona>.jsonl.gz` as
soon as that persona is done (hf: its wave; vllm: its group); an interrupted run (same config)
skips personas whose shard is complete, then merges the shards into `samples.jsonl.gz` in
persona order and removes them. Row seeds depend only on (seed, prompt, sample index), so a
resumed run writes the same samples as an uninterrupted one.

Adapter sets (`--adapter-set NAME=RUN[,RUN..]`, `--adapter-sets FILE`; see
`persona_cli.eval.adapter_sets`): several stacks through one model (hf: the base loaded once,
each stack merged into it in turn and the base restored, `persona_cli.generate.stacks`) or one
vLLM engine (each stack its own LoRARequest). Each set is an ordinary run directory, OUT/NAME,
with the files and manifest a run of that stack alone writes, resumed or skipped on its own;
the same stacks run one at a time give the same samples on hf (same seeds).

    persona-cli eval-markers --out runs/eval --model smollm2-135m --adapter runs/couple \
        --source villain --samples 10
    persona-cli eval-markers --out runs/evals --adapter-set base= \
        --adapter-set couple=runs/couple --adapter-set em25=runs/couple,runs/em@step_25
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_cli import adapters as adapters_mod
from persona_cli import bundled, models
from persona_cli.artifacts import read_json, sha256_file
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.eval.adapter_sets import check_sets, load_file
from persona_cli.eval.config import BACKENDS, MarkerEvalConfig
from persona_cli.eval.outputs import (
    VLLM_LOG,
    EvalJob,
    EvalResult,
    MarkerRun,
    complete_run,
    start_run,
)
from persona_cli.generate import ProgressFn
from persona_cli.generate.hf import generate_hf_groups
from persona_cli.generate.stacks import StackServer
from persona_cli.generate.vllm import PromptGroup, generate_vllm_work
from persona_cli.geometry import steer as steer_mod
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.registry import Persona, Question, load_personas, load_questions, select_personas

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
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


def _plan(cfg: MarkerEvalConfig) -> EvalPlan:
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
    return EvalPlan(
        model, stack, personas_file, personas, questions_file, questions, negatives, interventions
    )


def _interventions(
    cfg: MarkerEvalConfig, model: models.ResolvedModel
) -> list[steer_mod.Intervention]:
    """--steer / --ablate resolved and checked against the model (hf backend only)."""
    if not cfg.steering.active:
        return []
    if cfg.backend != "hf":
        raise UserError(f"--steer/--ablate: the hf backend only (not --backend {cfg.backend})")
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(model.path)
    return steer_mod.resolve_interventions(
        cfg.steering,
        model_revision=model.revision,
        model_spec=model.spec,
        n_blocks=arch.num_hidden_layers,
        hidden_size=arch.hidden_size,
    )


def _run_config(cfg: MarkerEvalConfig, plan: EvalPlan) -> dict[str, Any]:
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


def run_eval_markers(
    cfg: MarkerEvalConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> EvalResult:
    """Run (or resume, or recognise as finished) one eval-markers run directory; `progress`
    gets one task of completions (those found on disk count as done) once the work is known."""
    if cfg.adapter_sets or cfg.adapter_sets_file:
        raise UserError("--adapter-set: evaluate adapter sets with run_eval_markers_sets")
    job = EvalJob(cfg, Path(out))
    return run_eval_jobs([job], force=force, progress=progress)[0]


def set_jobs(cfg: MarkerEvalConfig, out: str | Path) -> list[EvalJob]:
    """One job per adapter set of `cfg`: its stack, its seed, its run directory under `out`."""
    if cfg.adapters:
        raise UserError("--adapter and --adapter-set: give one of them (a set holds its stack)")
    out = Path(out)
    check_sets(list(cfg.adapter_sets), out)
    jobs = []
    for s in cfg.adapter_sets:
        seed = cfg.generation.seed if s.seed is None else s.seed
        one = replace(
            cfg,
            adapters=s.adapters,
            adapter_sets=(),
            generation=replace(cfg.generation, seed=seed),
        )
        jobs.append(EvalJob(one, s.run_dir(out)))
    return jobs


def run_eval_markers_sets(
    cfg: MarkerEvalConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> list[EvalResult]:
    """Every adapter set of `cfg` (`persona_cli.eval.adapter_sets`) through one model (hf) or
    one engine (vllm), one ordinary run directory per set (`set_jobs`); each is resumed or
    recognised as finished on its own."""
    if cfg.adapter_sets_file is not None:
        sets = (*cfg.adapter_sets, *load_file(cfg.adapter_sets_file))
        cfg = replace(cfg, adapter_sets=sets, adapter_sets_file=None)
    if not cfg.adapter_sets:
        raise UserError("--adapter-set: no adapter sets given")
    return run_eval_jobs(set_jobs(cfg, out), force=force, progress=progress)


def _check_shared(jobs: list[EvalJob], plans: list[EvalPlan]) -> None:
    """What one model or engine can serve: one base model, one backend, and on vllm one engine
    configuration and one sampling setup (the seed may differ)."""
    first, model = jobs[0].cfg, plans[0].model
    for job, plan in zip(jobs[1:], plans[1:], strict=True):
        c = job.cfg
        if (plan.model.path, plan.model.revision) != (model.path, model.revision):
            raise UserError(f"{job.out}: another base model ({c.model}) than {first.model}")
        if c.backend != first.backend:
            raise UserError(f"{job.out}: backend {c.backend} differs from {first.backend}")
        same_sampling = replace(c.generation, seed=first.generation.seed) == first.generation
        if c.backend == "vllm" and (c.vllm != first.vllm or not same_sampling):
            raise UserError(f"{job.out}: one vLLM engine needs one engine and sampling setup")
    outs = [j.out.resolve() for j in jobs]
    if len(set(outs)) != len(outs):
        raise UserError("adapter sets: two sets write the same run directory")


def run_eval_jobs(
    jobs: list[EvalJob],
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> list[EvalResult]:
    """Run every job with one tokenizer and one model (hf: `StackServer` merges each stack into
    the base in turn) or one vLLM engine (each stack its own LoRARequest). Every run directory
    is opened (and checked) before anything is generated; each is finished as soon as its own
    completions are in (hf) or when the engine is done (vllm). Results in job order."""
    plans = [_plan(j.cfg) for j in jobs]
    _check_shared(jobs, plans)
    tokenizer = models.load_tokenizer(plans[0].model)
    report = inspect_template(tokenizer)
    rendered: dict[tuple[str, str], str] = {}

    def prompts_for(persona: Persona, questions: list[Question]) -> list[str]:
        system = SystemPrompt("text", persona.system_prompt)
        out = []
        for q in questions:
            key = (persona.system_prompt, q.text)
            if key not in rendered:
                user = [{"role": "user", "content": q.text}]
                rendered[key] = render(tokenizer, user, system, report, add_generation_prompt=True)
            out.append(rendered[key])
        return out

    started = [
        start_run(j, p, _run_config(j.cfg, p), force) for j, p in zip(jobs, plans, strict=True)
    ]
    work = [r for r in started if isinstance(r, MarkerRun)]
    total = sum(len(r.plan.personas) * len(r.plan.questions) * r.job.cfg.generation.n for r in work)
    left = sum(len(r.pending) * len(r.plan.questions) * r.job.cfg.generation.n for r in work)
    progress.begin("", total, done=total - left, unit="completions")

    def advance(n: int) -> None:
        progress.advance("", n)

    if work and work[0].job.cfg.backend == "hf":
        results = _run_hf(work, tokenizer, prompts_for, advance)
    else:
        results = _run_vllm(work, tokenizer, prompts_for, advance)
    return [results[id(r)] if isinstance(r, MarkerRun) else r for r in started]


Prompts = Callable[[Persona, list[Question]], list[str]]


def _run_hf(
    work: list[MarkerRun], tokenizer: Any, prompts_for: Prompts, progress: ProgressFn | None
) -> dict[int, EvalResult]:
    """One base model; the runs of one stack one after another, so each stack is merged once;
    each run finished as soon as its completions are in."""
    results: dict[int, EvalResult] = {}
    generating = [r for r in work if r.pending]
    server = None
    if generating:
        stacks = {r.stack_key for r in generating}
        server = StackServer(generating[0].plan.model, stacks=len(stacks))
    keys = list(dict.fromkeys(r.stack_key for r in work))
    for r in sorted(work, key=lambda r: keys.index(r.stack_key)):
        loaded = None
        if r.pending:
            assert server is not None
            loaded = server.serve(r.plan.stack)
            with steer_mod.intervening(loaded, r.plan.interventions):
                generate_hf_groups(
                    loaded,
                    tokenizer,
                    [prompts_for(p, r.plan.questions) for p in r.pending],
                    r.job.cfg.generation,
                    progress,
                    on_group=lambda i, c, r=r: r.save(r.pending[i], c),
                )
        results[id(r)] = complete_run(r, tokenizer, loaded)
    return results


def _run_vllm(
    work: list[MarkerRun], tokenizer: Any, prompts_for: Prompts, progress: ProgressFn | None
) -> dict[int, EvalResult]:
    """One engine (or one per merged base, `generate_vllm_work`) for every pending persona of
    every run; each persona's shard written as its group arrives, the runs finished after."""
    groups, owners = [], []
    generating = [r for r in work if r.pending]
    for r in generating:
        for p in r.pending:
            prompts = tuple(prompts_for(p, r.plan.questions))
            groups.append(PromptGroup(prompts, tuple(r.plan.stack), r.job.cfg.generation.seed))
            owners.append((r, p))
    log_file = generating[0].run.file(VLLM_LOG) if generating else None
    if generating:
        first = generating[0]
        generate_vllm_work(
            first.plan.model,
            groups,
            first.job.cfg.generation,
            engine=first.job.cfg.vllm,
            progress=progress,
            on_group=lambda i, c: owners[i][0].save(owners[i][1], c),
            log_path=log_file,
        )
    results: dict[int, EvalResult] = {}
    for r in work:
        if log_file is not None and r.pending and r is not generating[0]:
            shutil.copyfile(log_file, r.run.file(VLLM_LOG))  # the engine served every set
        results[id(r)] = complete_run(r, tokenizer, None)
    return results
