"""`persona-cli doctor`: versions, GPUs, disk, model cache, API keys (set or not), tools."""

from __future__ import annotations

from typing import Annotated

import orjson
import typer
from rich.table import Table

from persona_cli import doctor as doctor_lib
from persona_cli.cli.console import console, human_bytes


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Versions, GPUs, free disk, model cache, API keys and tools on this machine.

    Python and package versions, GPUs (or none), free disk, prepared models, which API keys are
    set (never their values), and whether vllm, just and pueue are present. Always exits 0.
    """
    rep = doctor_lib.report()
    if as_json:
        typer.echo(orjson.dumps(rep, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        return
    t = Table(title="persona-cli doctor", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("python", f"{rep['python']} ({rep['executable']})")
    for name, version in rep["packages"].items():
        if version is not None:
            t.add_row(name, version)
    dev = rep["device"]
    t.add_row("device", f"{dev['type']} x{dev['count']}: {', '.join(dev['names'])}")
    git = rep["git"]
    t.add_row("git", f"{git['commit']} dirty={git['dirty']}" if git["commit"] else git["reason"])
    t.add_row("PERSONA_CLI_HOME", rep["persona_cli_home"])
    t.add_row(
        "free disk",
        f"home {human_bytes(rep['disk_free_bytes']['home'])}, "
        f"cwd {human_bytes(rep['disk_free_bytes']['cwd'])}",
    )
    t.add_row("embedded wheel", rep["embedded_wheel"] or "-")
    for m in rep["models"]:
        state = f"prepared ({human_bytes(m['bytes'])})" if m["prepared"] else "not prepared"
        t.add_row(f"model {m['name']}", state)
    keys = ", ".join(f"{k}={'set' if v else 'unset'}" for k, v in rep["api_keys"].items())
    t.add_row("API keys", keys)
    t.add_row("vllm", "importable" if rep["vllm_importable"] else "not installed")
    for tool, where in rep["tools"].items():
        t.add_row(tool, where or "not found")
    console.print(t)
