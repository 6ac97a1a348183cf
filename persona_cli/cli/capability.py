"""`persona-cli eval-capability`: multiple-choice accuracy from answer-letter log-likelihoods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from persona_cli import adapters as adapters_lib
from persona_cli import bundled, capability, models
from persona_cli.artifacts import write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Adapters, Force, ModelSpec, OutDir, SystemPromptOpt, report_done
from persona_cli.rundir import open_run


def eval_capability(
    out: OutDir,
    model: ModelSpec = models.EMBEDDED,
    adapter: Adapters = None,
    items: Annotated[
        str | None,
        typer.Option(
            help="JSONL in the allenai/ai2_arc fields, or hf:NAME:CONFIG:SPLIT "
            "(default: data/mcq/mini_arc.jsonl).",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N items.")] = None,
    system_prompt: SystemPromptOpt = "none",
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 16,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    ] = "auto",
    force: Force = False,
) -> None:
    """Multiple-choice accuracy (ARC-Challenge style) by comparing option-letter log-probs.

    Writes capability.jsonl.gz (one row per item: every letter's log-prob, prediction,
    correctness) and summary.json (accuracy with a Wilson 95% interval).
    """
    source = items or str(bundled.mcq_file())
    adapter_paths = [str(p) for p in adapter or []]
    config = {
        "model": model,
        "adapters": adapter_paths,
        "items": source,
        "limit": limit,
        "system_prompt": system_prompt,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    mc_items = capability.load_items(source, limit)  # bad input fails before --out is made
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
    inputs = {"items": Path(source)} if not source.startswith("hf:") else {}
    run.finish(
        inputs=inputs,
        model=models.model_record(resolved, net),
        chat_template=guard_record(tok, system),
        protocol=capability.protocol(mc_items),
        extra={"adapters": adapters_lib.stack_record(stack)},
    )
