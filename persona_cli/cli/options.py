"""Option types shared by the experiment commands, so every command spells them the same way.

def eval_markers(out: OutDir, model: ModelSpec = "smollm2-135m", force: Force = False): ...
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from persona_cli.cli.console import err_console
from persona_cli.errors import UserError
from persona_cli.generate.config import GenerationConfig
from persona_cli.rundir import RunDir

OutDir = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Run directory to write (config.json, artifacts, manifest.json, DONE).",
        show_default=False,
    ),
]
Force = Annotated[
    bool, typer.Option("--force", help="Redo a finished run: clear --out and start afresh.")
]
ModelSpec = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="smollm2-135m (embedded), tiny-random, a local HF directory or a hub id.",
    ),
]
Adapters = Annotated[
    list[Path] | None,
    typer.Option(
        "--adapter",
        help="LoRA adapter (a PEFT dir or a training run dir); repeat to "
        "stack adapters in training order.",
        show_default=False,
    ),
]
SystemPromptOpt = Annotated[
    str,
    typer.Option(
        "--system-prompt",
        help="TEXT, 'none' (no system prompt; suppresses a "
        "template's injected default) or 'template-default'.",
    ),
]
PersonasFile = Annotated[
    Path | None,
    typer.Option(
        "--personas",
        help="Persona registry YAML (default: data/personas.yaml).",
        show_default=False,
    ),
]
QuestionsFile = Annotated[
    Path | None,
    typer.Option(
        "--questions",
        help="Question set YAML in the Betley et al. layout (default depends on the command).",
        show_default=False,
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice and sampler.")]


def generation_config(base: GenerationConfig | None = None, **given: Any) -> GenerationConfig:
    """`base` (default: GenerationConfig()) with every sampling option given (None keeps the
    base's value); a value GenerationConfig rejects ends as one line naming it."""
    try:
        chosen = {k: v for k, v in given.items() if v is not None}
        return replace(base or GenerationConfig(), **chosen)
    except ValueError as e:
        raise UserError(f"generation options: {e}") from None


def say_already_done(path: Path) -> None:
    err_console.print(
        f"{path}: already finished (DONE present); nothing to do. Pass --force to redo.",
        highlight=False,
    )


def report_done(run: RunDir) -> bool:
    """True (after saying so) when the run already finished and there is nothing to do."""
    if run.done:
        say_already_done(run.path)
    return run.done
