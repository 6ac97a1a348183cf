"""`persona-cli eval-capability`: multiple-choice accuracy from answer-letter log-likelihoods."""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import typer
from rich.table import Table

from persona_cli import models
from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import (
    Adapters,
    Force,
    ModelSpec,
    OutDir,
    PersonasFile,
    SystemPromptOpt,
    say_already_done,
)
from persona_cli.eval.capability import CapabilityConfig, run_eval_capability


def _subject_table(summary: dict) -> Table:
    t = Table(title="accuracy by subject and gold class")
    for col in ("subject", "n", "accuracy", "95% CI (Wilson)", "per gold class (acc/n)"):
        t.add_column(col, justify="left" if col == "subject" else "right")
    for name, entry in summary["per_subject"].items():
        acc = entry["accuracy"]
        classes = ", ".join(
            f"{c}:{e['accuracy']['rate']:.2f}/{e['n']}" for c, e in entry["per_class"].items()
        )
        t.add_row(
            name,
            str(entry["n"]),
            f"{acc['rate']:.3f}",
            f"[{acc['low']:.3f}, {acc['high']:.3f}]",
            classes,
        )
    return t


def _help(name: str) -> str:
    (f,) = [f for f in fields(CapabilityConfig) if f.name == name]
    return f.metadata["help"]


def eval_capability(
    out: OutDir,
    model: ModelSpec = models.EMBEDDED,
    adapter: Adapters = None,
    backend: Annotated[str, typer.Option(help=_help("backend"))] = "hf",
    items: Annotated[str | None, typer.Option(help=_help("items"), show_default=False)] = None,
    task: Annotated[str | None, typer.Option(help=_help("task"), show_default=False)] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help=_help("num_fewshot"), show_default=False)
    ] = None,
    subjects: Annotated[
        str | None,
        typer.Option(help="Comma-separated subjects to keep (MMLU layout).", show_default=False),
    ] = None,
    limit: Annotated[int | None, typer.Option(help=_help("limit"))] = None,
    system_prompt: SystemPromptOpt = "none",
    persona: Annotated[
        str | None,
        typer.Option(
            help="Persona id: its registry system prompt is the system prompt "
            "(instead of --system-prompt).",
            show_default=False,
        ),
    ] = None,
    personas: PersonasFile = None,
    batch_size: Annotated[int, typer.Option(help=_help("batch_size"))] = 16,
    dtype: Annotated[str, typer.Option(help=_help("dtype"))] = "auto",
    force: Force = False,
) -> None:
    """Multiple-choice accuracy (ARC / MMLU style) by comparing option log-likelihoods.

    Writes capability.jsonl.gz (one row per item: every option's log-prob, prediction,
    correctness, subject, gold index) and summary.json (accuracy with a Wilson 95% interval,
    overall and per subject and gold class, macro and micro averages). --backend lm-eval runs
    an lm-evaluation-harness task instead (pip install 'persona-cli[lm-eval]').
    """
    cfg = CapabilityConfig(
        model=model,
        adapters=tuple(str(p) for p in adapter or ()),
        backend=backend,
        items=items,
        task=task,
        num_fewshot=num_fewshot,
        subjects=tuple(s.strip() for s in subjects.split(",") if s.strip()) if subjects else None,
        limit=limit,
        system_prompt=system_prompt,
        persona=persona,
        personas_file=str(personas) if personas else None,
        batch_size=batch_size,
        dtype=dtype,
    )
    with ProgressDisplay("eval-capability") as display:
        result = run_eval_capability(
            cfg,
            out,
            force=force,
            on_plan=lambda n: display.begin("", n, unit="items"),
            progress=lambda n: display.advance("", n),
        )
    if result.already_done:
        say_already_done(result.run.path)
        return
    summary = result.summary
    acc = summary["accuracy"]
    console.print(
        f"accuracy {acc['rate']:.3f} ({acc['successes']}/{acc['n']}), Wilson 95% "
        f"[{acc['low']:.3f}, {acc['high']:.3f}], chance {summary['chance_accuracy']:.3f}"
    )
    if summary["per_subject"]:
        console.print(_subject_table(summary))
