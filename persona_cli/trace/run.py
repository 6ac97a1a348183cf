"""`replay-trace run` and `replay-trace stats` as library functions: configs, runs, outcomes.

run: a student and N teachers answer the same prompts (local models, OpenAI-compatible or
Anthropic endpoints); answers are normalised, the teachers' consensus found, and where the
student departs from it a DPO pair is written (chosen = a consensus teacher's answer). Every
input is checked before the run directory exists. Re-running resumes: local answers are kept
per answerer (`answers/ROLE_NAME.jsonl.gz`) and endpoint replies come from the run's cache. A
run stopped by its budget writes its rows but no manifest, so raising the budget continues it.

stats: disagreement with the consensus per domain and persona, per run and pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli import fields as common
from persona_cli.artifacts import iter_jsonl, write_json, write_jsonl
from persona_cli.errors import InputError, UserError
from persona_cli.fields import option
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.rundir import RunDir, open_run

RUN_COMMAND = "replay-trace run"
STATS_COMMAND = "replay-trace stats"
TRACE_FILE = "trace.jsonl.gz"
PAIRS_FILE = "pairs.jsonl.gz"
SUMMARY_FILE = "summary.json"
STATS_FILE = "trace_stats.json"


@dataclass(frozen=True)
class TraceConfig:
    """replay-trace run: who answers what, and when answers agree."""

    prompts: str | None = option(
        None,
        "Prompt JSONL, multiple-choice JSONL or question YAML (default: data/mcq/mini_arc.jsonl).",
    )
    task: str | None = option(None, "Override every prompt's task type: mc, number, code or free.")
    limit: int | None = option(None, "Use the first N prompts.")
    student: str = option(
        "student=local:smollm2-135m", "NAME=local:SPEC[,adapter=..,persona=..] or NAME=URL,model=M."
    )
    teachers: tuple[str, ...] = option(
        (), "A teacher spec (see --student); repeat. Overrides --roster."
    )
    roster: str | None = option(None, "Teacher roster YAML (default: data/teachers/local.yaml).")
    personas_file: str | None = common.personas_file()
    quorum: float = option(0.5, "Share of answering teachers that must agree (strictly more than).")
    budget_usd: float | None = option(
        None,
        "Stop before spending more than this on priced endpoints (not part of the run's "
        "identity: raise it and re-run to continue).",
    )
    max_concurrency: int = option(8, "Endpoint requests in flight.")
    max_failure_rate: float = option(0.2, "Stop a teacher whose failed share passes this.")
    max_retries: int = option(
        5, "Retries per endpoint request (429/5xx/timeouts), with jittered backoff."
    )
    seed: int = common.seed()


@dataclass(frozen=True)
class TraceStatsConfig:
    """replay-trace stats: which finished runs."""

    runs: tuple[str, ...] = option(help="replay-trace run directories.")


@dataclass
class TraceOutcome:
    run: RunDir
    summary: dict[str, Any] | None  # None when the run was finished before this call
    budget_stopped: bool = False


@dataclass
class TraceStatsOutcome:
    run: RunDir
    result: dict[str, Any] | None  # None when the run was finished before this call


def _check_personas(personas: dict, answerers: list, prompts: list, source: str) -> None:
    wanted = {a.persona for a in answerers if a.persona} | {p.persona for p in prompts if p.persona}
    unknown = sorted(wanted - set(personas))
    if unknown:
        raise InputError(source, f"unknown persona(s) {', '.join(map(repr, unknown))}")


def run_trace(
    cfg: TraceConfig, out: Path, *, force: bool = False, progress: Progress = NO_PROGRESS
) -> TraceOutcome:
    """The student's and teachers' answers, the consensus, the pairs (see the module doc)."""
    from persona_cli.protocol import answerers_sha256, method_protocol
    from persona_cli.registry import load_personas
    from persona_cli.trace import answering, replay
    from persona_cli.trace.prompts import load_prompts
    from persona_cli.trace.roster import parse_spec, resolve_teachers

    prompt_file = Path(cfg.prompts) if cfg.prompts else bundled.mcq_file()
    prompt_set = load_prompts(prompt_file, cfg.task, cfg.limit)
    roster = Path(cfg.roster) if cfg.roster else None
    teachers = resolve_teachers(
        roster, list(cfg.teachers), bundled.data_dir() / "teachers" / "local.yaml"
    )
    student = parse_spec(cfg.student, "--student")
    if student.name in {t.name for t in teachers}:
        raise UserError(f"--student {student.name!r}: a teacher has the same name")
    personas_path = Path(cfg.personas_file) if cfg.personas_file else bundled.personas_file()
    registry = load_personas(personas_path)
    _check_personas(registry, [student, *teachers], prompt_set, cfg.personas_file or "--personas")
    options = replay.ReplayOptions(
        quorum=cfg.quorum,
        budget_usd=cfg.budget_usd,
        max_concurrency=cfg.max_concurrency,
        max_failure_rate=cfg.max_failure_rate,
        max_retries=cfg.max_retries,
        seed=cfg.seed,
    )
    # The budget is left out of the run's identity: raising it and re-running continues.
    config = {
        "prompts": str(prompt_file),
        "task": cfg.task,
        "limit": cfg.limit,
        "student": student.to_dict(),
        "teachers": [t.to_dict() for t in teachers],
        "personas": cfg.personas_file,
        "quorum": cfg.quorum,
        "seed": cfg.seed,
    }
    run = open_run(out, command=RUN_COMMAND, config=config, force=force)
    if run.done:
        return TraceOutcome(run, None)
    spend = answering.Spend(cfg.budget_usd)
    models = answering.LocalModels()
    shared = {
        "seed": cfg.seed,
        "chunk": options.chunk,
        "client": {
            "max_concurrency": cfg.max_concurrency,
            "max_failure_rate": cfg.max_failure_rate,
            "max_retries": options.max_retries,
            "timeout_s": options.timeout_s,
        },
    }

    def answer(a: Any, role: str) -> list[dict]:
        key = f"{role} {a.name}"
        progress.begin(key, len(prompt_set), unit="prompts")
        return answering.answers(
            a,
            role,
            prompt_set,
            run.path,
            registry,
            models,
            spend,
            shared,
            progress=lambda n: progress.advance(key, n),
        )

    student_rows = answer(student, "student")
    teacher_rows = {t.name: answer(t, "teacher") for t in teachers}
    trace, pairs = replay.assemble(
        prompt_set, student, student_rows, teachers, teacher_rows, cfg.quorum
    )
    summary = replay.summarize(trace, pairs, teachers, spend.stopped)
    write_jsonl(run.file(TRACE_FILE), trace)
    write_jsonl(run.file(PAIRS_FILE), pairs)
    write_json(run.file(SUMMARY_FILE), summary)
    if spend.stopped:
        return TraceOutcome(run, summary, budget_stopped=True)
    inputs = {"prompts": prompt_file}
    if roster:
        inputs["roster"] = roster
    run.finish(
        inputs=inputs,
        protocol=method_protocol(
            trace_quorum=cfg.quorum,
            trace_answerers_sha256=answerers_sha256(config["student"], config["teachers"]),
        ),
        seeds=[cfg.seed],
        extra={"budget_usd": cfg.budget_usd, "spent_usd_this_run": spend.spent_usd},
    )
    return TraceOutcome(run, summary)


def trace_stats(cfg: TraceStatsConfig, out: Path, *, force: bool = False) -> TraceStatsOutcome:
    """Disagreement with consensus per domain and persona, per run and pooled."""
    from persona_cli.trace import replay

    traces = {}
    for r in map(Path, cfg.runs):
        path = r / TRACE_FILE
        if not path.is_file():
            raise InputError(r, f"no {TRACE_FILE} (not a finished replay-trace run)")
        traces[str(r)] = list(iter_jsonl(path))
    run = open_run(out, command=STATS_COMMAND, config={"runs": list(traces)}, force=force)
    if run.done:
        return TraceStatsOutcome(run, None)
    pooled = [row for rows in traces.values() for row in rows]
    result = {
        "schema_version": replay.SCHEMA_VERSION,
        "runs": {
            k: {
                "by_domain": replay.disagreement(v, "domain"),
                "by_persona": replay.disagreement(v, "persona"),
            }
            for k, v in traces.items()
        },
        "pooled": {
            "by_domain": replay.disagreement(pooled, "domain"),
            "by_persona": replay.disagreement(pooled, "persona"),
        },
    }
    write_json(run.file(STATS_FILE), result)
    run.finish(inputs={f"trace:{k}": Path(k) / TRACE_FILE for k in traces})
    return TraceStatsOutcome(run, result)
