"""`persona-cli replay-trace run|stats`: teacher consensus against a student, as DPO pairs.

    persona-cli replay-trace run --prompts data/mcq/mini_arc.jsonl --limit 20 --out runs/trace
    persona-cli replay-trace run ... --teacher big=http://127.0.0.1:8000/v1,model=smol \\
        --teacher medic=local:smollm2-135m,persona=paramedic --budget-usd 5
    persona-cli replay-trace stats runs/trace runs/trace_em --out runs/trace_stats
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console, err_console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.errors import EXIT_CHECK_FAILED
from persona_cli.trace.run import TraceConfig, TraceStatsConfig

app = typer.Typer(
    help="Teacher consensus vs a student's answers, written as DPO pairs.", no_args_is_help=True
)


@app.command("run")
@configured(
    TraceConfig,
    flags={"teachers": "--teacher", "personas_file": "--personas"},
    repeat={"teachers"},
)
def run(cfg: TraceConfig, out: Path, force: bool) -> None:
    """A student and N teachers answer the same prompts; where the student departs from the
    teachers' consensus a DPO pair is written (chosen = a consensus teacher's answer).

    Ties and prompts without a quorum are reported, never paired. Re-running resumes: local
    answers are kept per answerer and endpoint replies come from the run's cache.
    """
    from persona_cli.trace.run import run_trace

    with ProgressDisplay("replay-trace") as display:
        outcome = run_trace(cfg, out, force=force, progress=display)
    if outcome.summary is None:
        say_already_done(out)
        return
    _print(outcome.summary)
    if outcome.budget_stopped:
        err_console.print(
            f"budget of ${cfg.budget_usd} reached: unsent requests are marked 'budget'."
            " Re-run with a larger --budget-usd to continue (answers so far are "
            "kept).",
            highlight=False,
        )
        raise typer.Exit(EXIT_CHECK_FAILED)


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
@configured(TraceStatsConfig, arguments={"runs"})
def stats(cfg: TraceStatsConfig, out: Path, force: bool) -> None:
    """Disagreement with consensus per domain and persona, per run and pooled.

    Where does an altered model depart from the teachers? Writes trace_stats.json.
    """
    from persona_cli.trace.run import trace_stats

    outcome = trace_stats(cfg, out, force=force)
    if outcome.result is None:
        say_already_done(out)
        return
    _disagreement_table(outcome.result["pooled"]["by_domain"], "domain")
    _disagreement_table(outcome.result["pooled"]["by_persona"], "persona")
