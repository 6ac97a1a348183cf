"""The `persona-cli` command: one subcommand per experiment primitive.

Each command module is a thin Typer layer: parse options, build a config, call one library
function, print the result with rich. Errors a user can cause (`persona_cli.errors.UserError`)
end as one `error: ...` line on stderr with the error's exit code, never a traceback.

    persona-cli --help
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import click
import typer
from rich.logging import RichHandler
from rich.markup import escape
from typer.core import TyperArgument, TyperGroup, TyperOption

from persona_cli import __version__
from persona_cli.cli import (
    capability,
    doctor,
    dose,
    eval,
    geometry,
    judge,
    models,
    paired,
    proportions,
    rl,
    stats,
    trace,
    train,
    validate,
)
from persona_cli.cli import probe as probe_cli
from persona_cli.cli.console import err_console
from persona_cli.errors import UserError

PANEL_SETUP = "Setup and checks"
PANEL_STATS = "Statistics and reports"
PANEL_MATRIX = "Coupling matrix and judging"


def _display_type(self: TyperOption, ctx: click.Context) -> str | None:
    """Option type column of --help: nothing for a flag, PATH / TEXT / INT for a value (Typer
    0.29 prints `<bool>`, `<path>`, `<list[Path]>`)."""
    if self.metavar is not None:
        return self.metavar
    if self.is_flag or self.is_bool_flag:
        return None
    shown = TyperOption.display_type(self, ctx)
    if shown and shown.startswith("<") and shown.endswith(">"):
        inner = shown[1:-1]
        repeated = inner.startswith("list[")
        name = inner.removeprefix("list[").removesuffix("]")
        name = {"str": "TEXT", "Path": "PATH", "path": "PATH"}.get(name, name.upper())
        return name + ("..." if repeated else "")
    return shown


TyperOption.display_type_rich = _display_type  # type: ignore[method-assign]
# An argument's metavar is its name column already; no `<list[str]>` type beside it.
TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]


class PersonaGroup(TyperGroup):
    """Turns UserError into one line and an exit code, for every (nested) command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            message = escape(str(e))  # brackets in a message ([ZLT], stage[i]) are not markup
            err_console.print(
                f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True
            )
            # A protocol refusal lists each differing field with its values, one per line.
            for difference in getattr(e, "differences", ()):
                line = difference.describe()
                if line not in str(e):  # not said on the error line already
                    err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    name="persona-cli",
    cls=PersonaGroup,
    help="Experiment primitives for persona, marker-transfer and emergent-misalignment research. "
    "Every command writes one run directory (config.json, artifacts, manifest.json, DONE).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from persona_cli.manifest import git_info

        git = git_info()
        commit = git["commit"][:12] + (", dirty" if git["dirty"] else "") if git["commit"] else ""
        typer.echo(f"persona-cli {__version__}" + (f" (git {commit})" if commit else ""))
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at DEBUG level (default INFO).")
    ] = False,
) -> None:
    level = logging.DEBUG if verbose else os.environ.get("PERSONA_CLI_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


app.command("doctor", rich_help_panel=PANEL_SETUP)(doctor.doctor)
app.command("validate", rich_help_panel=PANEL_SETUP)(validate.validate)
app.add_typer(models.app, name="models", rich_help_panel=PANEL_SETUP)
app.command("eval-markers", rich_help_panel="Marker transfer and EM")(eval.eval_markers)
app.command("stats", rich_help_panel=PANEL_STATS)(stats.stats)
app.command("compare", rich_help_panel=PANEL_STATS)(stats.compare)
app.command("report", rich_help_panel=PANEL_STATS)(stats.report)
app.command("proportions", rich_help_panel=PANEL_STATS)(proportions.proportions)
app.command("eval-capability", rich_help_panel=PANEL_MATRIX)(capability.eval_capability)
app.command("compare-items", rich_help_panel=PANEL_STATS)(paired.compare_items)
app.command("judge-align", rich_help_panel=PANEL_MATRIX)(judge.judge_align_command)
train.register(app, rich_help_panel="Marker transfer and EM")
app.add_typer(dose.app, name="dose-sweep", rich_help_panel="Marker transfer and EM")
app.add_typer(geometry.app, name="persona-vectors", rich_help_panel="Marker transfer and EM")
app.add_typer(trace.app, name="replay-trace", rich_help_panel="Trace replay and RL")
rl.register(app, rich_help_panel="Trace replay and RL")

app.command("extract-vhack", rich_help_panel="Reward-hack probe")(probe_cli.extract_vhack)
app.add_typer(probe_cli.app, name="probe", rich_help_panel="Reward-hack probe")
app.command("probe-uat", rich_help_panel="Reward-hack probe")(probe_cli.probe_uat)


def main() -> None:
    app()
