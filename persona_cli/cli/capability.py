"""`persona-cli eval-capability`: multiple-choice accuracy from answer-letter log-likelihoods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from persona_cli import adapters as adapters_lib
from persona_cli import bundled, capability, models, registry
from persona_cli.artifacts import write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import (
    Adapters,
    Force,
    ModelSpec,
    OutDir,
    PersonasFile,
    SystemPromptOpt,
    report_done,
)
from persona_cli.errors import UserError
from persona_cli.rundir import open_run


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


def eval_capability(
    out: OutDir,
    model: ModelSpec = models.EMBEDDED,
    adapter: Adapters = None,
    items: Annotated[
        str | None,
        typer.Option(
            help="JSONL in the allenai/ai2_arc or cais/mmlu layout (detected per file), or "
            "hf:NAME:CONFIG:SPLIT (default: data/mcq/mini_arc.jsonl; "
            "data/mcq/mini_mmlu.jsonl ships too).",
            show_default=False,
        ),
    ] = None,
    subjects: Annotated[
        str | None,
        typer.Option(help="Comma-separated subjects to keep (MMLU layout).", show_default=False),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N items (after --subjects).")
    ] = None,
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
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 16,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    ] = "auto",
    force: Force = False,
) -> None:
    """Multiple-choice accuracy (ARC-Challenge style) by comparing option-letter log-probs.

    Writes capability.jsonl.gz (one row per item: every letter's log-prob, prediction,
    correctness, subject, gold index) and summary.json (accuracy with a Wilson 95% interval,
    overall and per subject and gold class, macro and micro averages).
    """
    source = items or str(bundled.mcq_file())
    subject_list = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    if persona is not None:
        if system_prompt != "none":
            raise UserError("--persona and --system-prompt: give one of them")
        registry_file = personas or bundled.personas_file()
        (chosen,) = registry.select_personas(
            registry.load_personas(registry_file), [persona], f"--persona ({registry_file})"
        )
        system_prompt = chosen.system_prompt
    adapter_paths = [str(p) for p in adapter or []]
    config = {
        "model": model,
        "adapters": adapter_paths,
        "items": source,
        "subjects": subject_list,
        "limit": limit,
        "persona": persona,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    mc_items = capability.load_items(
        source, limit, subject_list
    )  # bad input fails before --out is made
    stack = adapters_lib.resolve_stack(adapter_paths)
    run = open_run(out, command="eval-capability", config=config, force=force)
    if report_done(run):
        return
    resolved = models.ensure_prepared(model)
    adapters_lib.check_stack(stack, resolved)
    tok = models.load_tokenizer(resolved)
    net = adapters_lib.load_with_adapters(resolved, stack, dtype=dtype)
    system = SystemPrompt.parse(system_prompt)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    ) as bar:
        task = bar.add_task("scoring items", total=len(mc_items))
        rows = capability.score_items(
            net,
            tok,
            mc_items,
            system,
            inspect_template(tok),
            batch_size=batch_size,
            progress=lambda n: bar.advance(task, n),
        )
    write_jsonl(run.file("capability.jsonl.gz"), rows)
    summary = capability.summarize(rows)
    write_json(run.file("summary.json"), summary)
    acc = summary["accuracy"]
    console.print(
        f"accuracy {acc['rate']:.3f} ({acc['successes']}/{acc['n']}), Wilson 95% "
        f"[{acc['low']:.3f}, {acc['high']:.3f}], chance {summary['chance_accuracy']:.3f}"
    )
    if summary["per_subject"]:
        console.print(_subject_table(summary))
    inputs = {"items": Path(source)} if not source.startswith("hf:") else {}
    if persona is not None:
        inputs["personas"] = Path(personas or bundled.personas_file())
    run.finish(
        inputs=inputs,
        model=models.model_record(resolved, net),
        chat_template=guard_record(tok, system),
        protocol=capability.protocol(mc_items, persona),
        extra={"adapters": adapters_lib.stack_record(stack)},
    )
