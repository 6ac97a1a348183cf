"""`persona-cli validate FILE...`: schema checks for datasets, artifacts and run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_cli import validate as validate_lib
from persona_cli.cli.console import console, err_console
from persona_cli.errors import EXIT_BAD_INPUT


def validate(
    files: Annotated[
        list[Path], typer.Argument(help="Files or run directories to check.", show_default=False)
    ],
    kind: Annotated[
        str | None,
        typer.Option(
            help=f"Force the kind instead of reading it from the name: "
            f"{', '.join(validate_lib.KINDS)}."
        ),
    ] = None,
    max_problems: Annotated[int, typer.Option(help="Stop listing a file after this many.")] = 20,
) -> None:
    """Check datasets, artifacts and run directories against their schemas.

    Chat JSONL, samples, per-step files, manifests, configs, persona registries and question
    sets. Prints `FILE:LINE: what is wrong` and exits 2 when anything is invalid; exits 0 with a
    one-line summary per file when all are valid.
    """
    bad = 0
    for path in files:
        rep = validate_lib.validate_file(path, kind, max_problems=max_problems)
        if rep.ok:
            unit = "entries" if rep.kind in ("personas", "questions") else "items"
            console.print(f"ok  {path} ({rep.kind}, {rep.items} {unit})", highlight=False)
        else:
            bad += 1
            for line in rep.problems:
                err_console.print(line, highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)
