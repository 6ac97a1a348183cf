"""`persona-cli models list|prepare|info`: the built-in models and any model spec's facts."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.table import Table

from persona_cli import models as models_lib
from persona_cli.cli.console import console, err_console, human_bytes

app = typer.Typer(
    help="Built-in models (smollm2-135m embedded, tiny-random for tests) and model facts.",
    no_args_is_help=True,
)


@app.command("list")
def list_models() -> None:
    """List the built-in models, whether they are prepared, and where."""
    t = Table(title=f"models in {models_lib.models_dir()}")
    for col in ("name", "prepared", "size", "description"):
        t.add_column(col)
    for m in models_lib.list_builtin():
        t.add_row(
            m["name"], "yes" if m["prepared"] else "no", human_bytes(m["bytes"]), m["description"]
        )
    console.print(t)


@app.command("prepare")
def prepare(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="Built-ins to prepare (default: smollm2-135m and tiny-random).", show_default=False
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if prepared.")] = False,
) -> None:
    """Build the built-in models into the local cache (offline, once).

    Converts the embedded SmolLM2-135M-Instruct from its wheel's GGUF into a safetensors
    directory under $PERSONA_CLI_HOME (default ~/.cache/persona-cli) and builds tiny-random.
    About a minute the first time, a no-op after.
    """
    names = names or [models_lib.EMBEDDED, models_lib.TINY]
    for name in names:
        with err_console.status(f"preparing {name}"):
            path = models_lib.prepare([name], force=force)[0]
        console.print(f"{name}: {path}", highlight=False)


@app.command("info")
def info(
    spec: Annotated[str, typer.Argument(help="smollm2-135m, tiny-random, a directory or hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Architecture, size, tokenizer and chat-template facts of a model.

    Includes whether the chat template injects a default system prompt when none is given.
    """
    rep = models_lib.model_info(spec)
    if as_json:
        typer.echo(orjson.dumps(rep, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        return
    t = Table(title=f"model {spec}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    m = rep["model"]
    t.add_row("path", m["path"])
    t.add_row("kind", m["kind"])
    t.add_row("revision", str(m["revision"]))
    for k, v in rep["architecture"].items():
        t.add_row(k, str(v))
    t.add_row("size on disk", human_bytes(rep["bytes_on_disk"]))
    for k, v in rep["tokenizer"].items():
        t.add_row(k, str(v))
    ct = rep["chat_template"]
    t.add_row("template sha256", ct["template_sha256"])
    t.add_row("system role", "supported" if ct["supports_system_role"] else "not supported")
    injects = ct["injects_default_system_prompt"]
    t.add_row(
        "injects default system prompt",
        f"YES: {ct['default_system_prompt']!r}" if injects else "no",
    )
    console.print(t)
