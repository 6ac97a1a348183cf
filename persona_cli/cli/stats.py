"""`persona-cli stats | compare | report`: multi-seed summaries, guarded comparisons, reports
(thin layer over `persona_cli.compare_runs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.compare_runs import CompareConfig, CompareOutcome, ReportConfig, StatsConfig

CONDITION_FLAGS = {"conditions": "--condition -c"}
REPEATED = {"conditions"}


def _print(outcome: CompareOutcome, metric: str) -> None:
    if outcome.already_done:
        say_already_done(outcome.out)
        return
    result: dict[str, Any] = outcome.result or {}
    t = Table(title=f"{metric} by condition")
    for col in ("condition", "n", "mean", "±95% CI", "per seed"):
        t.add_column(col)
    for name, c in result["conditions"].items():
        hw = f"{c['half_width']:.4f}" if c["half_width"] is not None else "-"
        per = ", ".join(f"{s}:{v:.3f}" for s, v in zip(c["seeds"], c["values"], strict=True))
        t.add_row(name, str(c["n_seeds"]), f"{c['mean']:.4f}", hw, per)
    console.print(t)
    for d in outcome.allowed_differences:
        err_console.print(
            escape(f"allowed protocol difference (--allow-diff): {d['field']}: {d['values']}"),
            highlight=False,
        )


@configured(StatsConfig, flags=CONDITION_FLAGS, repeat=REPEATED)
def stats(cfg: StatsConfig, out: Path, force: bool) -> None:
    """Multi-seed summary per condition: n, mean, std, t-based CI, per-seed values, run ids.

    Runs within a condition must share their protocol (see `compare`); writes stats.json.
    """
    from persona_cli.compare_runs import run_stats

    _print(run_stats(cfg, out, force=force), cfg.metric)


@configured(CompareConfig, flags=CONDITION_FLAGS, repeat=REPEATED)
def compare(cfg: CompareConfig, out: Path, force: bool) -> None:
    """Welch tests and Cohen's d against a reference, Bonferroni and Holm corrected.

    Refuses (exit 3, naming each field) when the runs differ in protocol: effective batch,
    world size, optimizer steps, learning rate, judge model or prompt, sampling temperature or
    count, question set, chat template or system prompt. Writes compare.json and compare.md.
    """
    from persona_cli.compare_runs import run_compare

    outcome = run_compare(cfg, out, force=force)
    _print(outcome, cfg.metric)
    if outcome.result is not None:
        console.print(outcome.markdown, highlight=False)
        console.print(outcome.result["cohens_d_convention"], highlight=False)


@configured(ReportConfig, arguments={"runs"})
def report(cfg: ReportConfig, out: Path, force: bool) -> None:
    """Markdown report with PNG figures from stats/compare runs.

    Bar charts of each condition's mean with 95% CI error bars and per-seed dots, pre/post plots
    paired by seed against the reference, and the numbers as tables. Writes report.md and PNGs.
    Refuses (exit 3) when runs of the same command across the inputs differ in protocol beyond
    what each input declared (--allow-diff adds more).
    """
    from persona_cli.compare_runs import run_report

    outcome = run_report(cfg, out, force=force)
    if outcome.already_done:
        say_already_done(out)
        return
    console.print(f"report: {out / 'report.md'}", highlight=False)
    for fig in outcome.figures:
        console.print(f"figure: {fig}", highlight=False)
