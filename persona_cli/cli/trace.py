"""`persona-cli replay-trace run|stats`: teacher consensus against a student, as DPO pairs.

    persona-cli replay-trace run --prompts data/mcq/mini_arc.jsonl --limit 20 --out runs/trace
    persona-cli replay-trace run ... --teacher big=http://127.0.0.1:8000/v1,model=smol \\
        --teacher medic=local:smollm2-135m,persona=paramedic --budget-usd 5
    persona-cli replay-trace stats runs/trace runs/trace_em --out runs/trace_stats
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from persona_cli import bundled
from persona_cli.artifacts import iter_jsonl, write_json, write_jsonl
from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Force, OutDir, PersonasFile, Seed, report_done
from persona_cli.errors import EXIT_CHECK_FAILED, InputError, UserError
from persona_cli.protocol import answerers_sha256, method_protocol
from persona_cli.registry import load_personas
from persona_cli.rundir import open_run
from persona_cli.trace import answering, replay
from persona_cli.trace.prompts import load_prompts
from persona_cli.trace.roster import parse_spec, resolve_teachers

app = typer.Typer(
    help="Teacher consensus vs a student's answers, written as DPO pairs.", no_args_is_help=True
)


def _check_personas(personas: dict, answerers: list, prompts: list, source: str) -> None:
    wanted = {a.persona for a in answerers if a.persona} | {p.persona for p in prompts if p.persona}
    unknown = sorted(wanted - set(personas))
    if unknown:
        raise InputError(source, f"unknown persona(s) {', '.join(map(repr, unknown))}")


@app.command("run")
def run(
    out: OutDir,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Prompt JSONL, multiple-choice JSONL or "
            "question YAML (default: "
            "data/mcq/mini_arc.jsonl).",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="Override every prompt's task type: mc, number, code or free.", show_default=False
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = None,
    student: Annotated[
        str, typer.Option(help="NAME=local:SPEC[,adapter=..,persona=..] or NAME=URL,model=M.")
    ] = "student=local:smollm2-135m",
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            help="A teacher spec (see --student); repeat. Overrides --roster.", show_default=False
        ),
    ] = None,
    roster: Annotated[
        Path | None,
        typer.Option(
            help="Teacher roster YAML (default: data/teachers/local.yaml).", show_default=False
        ),
    ] = None,
    personas: PersonasFile = None,
    quorum: Annotated[
        float,
        typer.Option(help="Share of answering teachers that must agree (strictly more than)."),
    ] = 0.5,
    budget_usd: Annotated[
        float | None,
        typer.Option(
            help="Stop before spending more than this on priced endpoints.", show_default=False
        ),
    ] = None,
    max_concurrency: Annotated[int, typer.Option(help="Endpoint requests in flight.")] = 8,
    max_failure_rate: Annotated[
        float, typer.Option(help="Stop a teacher whose failed share passes this.")
    ] = 0.2,
    max_retries: Annotated[
        int,
        typer.Option(
            help="Retries per endpoint request (429/5xx/timeouts), with jittered backoff."
        ),
    ] = 5,
    seed: Seed = 42,
    force: Force = False,
) -> None:
    """A student and N teachers answer the same prompts; where the student departs from the
    teachers' consensus a DPO pair is written (chosen = a consensus teacher's answer).

    Ties and prompts without a quorum are reported, never paired. Re-running resumes: local
    answers are kept per answerer and endpoint replies come from the run's cache.
    """
    prompt_file = prompts or bundled.mcq_file()
    prompt_set = load_prompts(prompt_file, task, limit)
    teachers = resolve_teachers(
        roster, teacher or [], bundled.data_dir() / "teachers" / "local.yaml"
    )
    stud = parse_spec(student, "--student")
    if stud.name in {t.name for t in teachers}:
        raise UserError(f"--student {stud.name!r}: a teacher has the same name")
    registry = load_personas(personas or bundled.personas_file())
    _check_personas(registry, [stud, *teachers], prompt_set, str(personas or "--personas"))
    options = replay.ReplayOptions(
        quorum=quorum,
        budget_usd=budget_usd,
        max_concurrency=max_concurrency,
        max_failure_rate=max_failure_rate,
        max_retries=max_retries,
        seed=seed,
    )
    # The budget is left out of the run's identity: raising it and re-running continues.
    config = {
        "prompts": str(prompt_file),
        "task": task,
        "limit": limit,
        "student": stud.to_dict(),
        "teachers": [t.to_dict() for t in teachers],
        "personas": str(personas) if personas else None,
        "quorum": quorum,
        "seed": seed,
    }
    run_dir = open_run(out, command="replay-trace run", config=config, force=force)
    if report_done(run_dir):
        return
    spend = answering.Spend(budget_usd)
    models = answering.LocalModels()
    shared = {
        "seed": seed,
        "chunk": options.chunk,
        "client": {
            "max_concurrency": max_concurrency,
            "max_failure_rate": max_failure_rate,
            "max_retries": options.max_retries,
            "timeout_s": options.timeout_s,
        },
    }
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    ) as bar:

        def answer(a, role: str) -> list[dict]:
            t = bar.add_task(f"{role} {a.name}", total=len(prompt_set))
            return answering.answers(
                a,
                role,
                prompt_set,
                run_dir.path,
                registry,
                models,
                spend,
                shared,
                progress=lambda n: bar.advance(t, n),
            )

        student_rows = answer(stud, "student")
        teacher_rows = {t.name: answer(t, "teacher") for t in teachers}
    trace, pairs = replay.assemble(prompt_set, stud, student_rows, teachers, teacher_rows, quorum)
    summary = replay.summarize(trace, pairs, teachers, spend.stopped)
    write_jsonl(run_dir.file("trace.jsonl.gz"), trace)
    write_jsonl(run_dir.file("pairs.jsonl.gz"), pairs)
    write_json(run_dir.file("summary.json"), summary)
    _print(summary)
    if spend.stopped:
        err_console.print(
            f"budget of ${budget_usd} reached: unsent requests are marked 'budget'."
            " Re-run with a larger --budget-usd to continue (answers so far are "
            "kept).",
            highlight=False,
        )
        raise typer.Exit(EXIT_CHECK_FAILED)
    inputs = {"prompts": prompt_file}
    if roster:
        inputs["roster"] = roster
    run_dir.finish(
        inputs=inputs,
        protocol=method_protocol(
            trace_quorum=quorum,
            trace_answerers_sha256=answerers_sha256(config["student"], config["teachers"]),
        ),
        seeds=[seed],
        extra={"budget_usd": budget_usd, "spent_usd_this_run": spend.spent_usd},
    )


def _print(summary: dict) -> None:
    c = summary["consensus"]
    console.print(
        f"{summary['n_prompts']} prompts: "
        + ", ".join(f"{k} {v}" for k, v in c.items())
        + f"; {summary['n_pairs']} DPO pairs",
        highlight=False,
    )
    t = Table(title="teachers")
    for col in ("teacher", "ok", "failed", "budget", "tokens in/out", "cost USD", "reasons"):
        t.add_column(col)
    for name, s in summary["teachers"].items():
        flag = " (failed every call)" if s["failed_every_call"] else ""
        t.add_row(
            name + flag,
            str(s["ok"]),
            str(s["failed"]),
            str(s["budget_skipped"]),
            f"{s['prompt_tokens']}/{s['completion_tokens']}",
            f"{s['cost_usd']:.4f}",
            "; ".join(f"{k} x{v}" for k, v in s["failure_reasons"].items()),
        )
    console.print(t)
    _disagreement_table(summary["disagreement_by_domain"], "domain")


def _disagreement_table(rates: dict, key: str) -> None:
    t = Table(title=f"student vs consensus, by {key}")
    for col in (key, "disagree/n", "rate", "Wilson 95%"):
        t.add_column(col)
    for k, r in rates.items():
        t.add_row(
            k,
            f"{r['successes']}/{r['n']}",
            f"{r['rate']:.3f}",
            f"[{r['low']:.3f}, {r['high']:.3f}]",
        )
    console.print(t)


@app.command("stats")
def stats(
    runs: Annotated[
        list[Path], typer.Argument(help="replay-trace run directories.", show_default=False)
    ],
    out: OutDir,
    force: Force = False,
) -> None:
    """Disagreement with consensus per domain and persona, per run and pooled.

    Where does an altered model depart from the teachers? Writes trace_stats.json.
    """
    traces = {}
    for r in runs:
        path = r / "trace.jsonl.gz"
        if not path.is_file():
            raise InputError(r, "no trace.jsonl.gz (not a finished replay-trace run)")
        traces[str(r)] = list(iter_jsonl(path))
    run_dir = open_run(
        out, command="replay-trace stats", config={"runs": list(traces)}, force=force
    )
    if report_done(run_dir):
        return
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
    write_json(run_dir.file("trace_stats.json"), result)
    _disagreement_table(result["pooled"]["by_domain"], "domain")
    _disagreement_table(result["pooled"]["by_persona"], "persona")
    run_dir.finish(inputs={f"trace:{k}": Path(k) / "trace.jsonl.gz" for k in traces})
