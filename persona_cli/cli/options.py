"""Options from config dataclasses: a command's options are declared once, as config fields.

    @configured(MarkerEvalConfig, flags={"generation.n": "--samples -k"})
    def eval_markers(cfg: MarkerEvalConfig, out: Path, force: bool) -> None:
        '''Marker rate per persona ...'''

`configured` gives the command one Typer option per leaf field of the config (nested configs
are walked: `generation.temperature` is `--temperature`), with the field's help and default;
`flags` renames where a flag differs from the field name (`"--samples -k"`, a boolean's
`"--case-sensitive/--ignore-case"`; `COMMON_FLAGS` spells model, adapters, personas and
questions the same everywhere); tuple fields take a comma list (`--lora-targets q,v`) or, in
`repeat`, a repeatable option; `arguments` are positional; `parsers` turn a flag's text into the
field's value where the type alone cannot (`--layers all`); `no_flag` names fields set only in a
config file, each with its reason; `links` lets one flag set two fields. Every such command
also takes:

    --config FILE      YAML or JSON whose keys are the config's fields (nested as mappings);
                       an unknown key is an error naming it and the file; flags given on the
                       command line override the file
    --print-config     print the resolved config as YAML (a starting file) and exit
    --out DIR, --force the run directory (unless run_dir=False)
    --report-to wandb  (report_to=True) mirror the run to wandb (`persona_cli.tracking`)

The decorated function receives the frozen config and the run-control options; it builds
nothing itself (STYLE.md: parse -> frozen config -> one library call -> print).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from persona_cli import tracking
from persona_cli.cli.console import err_console
from persona_cli.config_tree import (
    REQUIRED,
    Leaf,
    coerce,
    defaults_plain,
    leaves,
    load_file,
    optional_inner,
    resolve,
    to_plain,
    tuple_item,
)
from persona_cli.errors import UserError

# Registry of configured commands (function -> declaration), walked by the tests.
DECLARED: dict[Callable[..., Any], Declaration] = {}

_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: ""}
# Flags every command spells the same way, by field name (a command's `flags` can still rename).
COMMON_FLAGS = {
    "model": "--model -m",
    "adapters": "--adapter",
    "personas_file": "--personas",
    "questions_file": "--questions",
}
COMMON_REPEAT = {"adapters", "allow_diff"}  # one --adapter per stacked adapter, in order


@dataclass(frozen=True)
class Declaration:
    """How one command's options map onto its config's fields."""

    config_cls: type
    flags: Mapping[str, str]  # dotted field path -> the option's first name, e.g. "--samples"
    no_flag: Mapping[str, str]  # dotted field path -> why it has no flag
    arguments: frozenset[str]  # dotted field paths taken as positional arguments
    run_dir: bool
    defaults: Callable[[], Any] | None

    def default_config(self) -> Any:
        return self.defaults() if self.defaults is not None else None


def _decls(leaf: Leaf, spec: str | None) -> tuple[str, ...]:
    if spec is not None:
        return tuple(spec.split())
    flag = "--" + leaf.name.replace("_", "-")
    inner, _ = optional_inner(leaf.type)
    if inner is bool:
        return (f"{flag}/--no-{leaf.name.replace('_', '-')}",)
    return (flag,)


def _cli_default(leaf: Leaf, repeat: bool) -> Any:
    """The leaf's default as the option's own default (shown in --help; never read: only
    flags given on the command line are applied, see `configured`)."""
    value = leaf.default
    if value is REQUIRED or value is None:
        return None
    if isinstance(value, tuple):
        items = [str(v) for v in value]
        return items if repeat else (",".join(items) or None)
    if isinstance(value, Path):
        return str(value)
    return value


def _param(leaf: Leaf, decls: tuple[str, ...], repeat: bool, argument: bool) -> Any:
    """The Typer annotation of the parameter for one leaf."""
    inner, _ = optional_inner(leaf.type)
    item = tuple_item(inner)
    help_text = leaf.help.replace("[", r"\[")  # rich markup: "[ZLT]" is text
    if leaf.required:
        help_text += r" \[required]"
    if argument:  # a list field takes every remaining argument; a scalar one, one argument
        info = typer.Argument(help=help_text, show_default=False, metavar=leaf.name.upper())
        return Annotated[list[str] | None if item is not None else str | None, info]
    if item is not None:
        metavar = _METAVARS.get(item, "TEXT")
        if repeat:
            tp: Any = list[Path] | None if item is Path else list[str] | None
        else:
            tp, metavar = str | None, f"{metavar},.."
    else:
        metavar = _METAVARS.get(inner, "TEXT")
        tp = inner | None if inner in (int, float, str, bool, Path) else str | None
    if leaf.name.endswith(("_file", "_files")):
        metavar = "FILE" if item is None or repeat else "FILE,.."
    elif leaf.name == "adapters":
        metavar = "RUN"
    default = _cli_default(leaf, repeat)
    info = typer.Option(
        *decls,
        help=help_text,
        show_default=default not in (None, "", []),
        metavar=metavar,
    )
    return Annotated[tp, info]


def _from_flag(value: Any, leaf: Leaf, flag: str) -> Any:
    """A flag's parsed value as the leaf's type (comma lists split; strings typed)."""
    inner, _ = optional_inner(leaf.type)
    item = tuple_item(inner)
    if item is not None:
        parts = value if isinstance(value, list) else [p.strip() for p in value.split(",")]
        parts = [p for p in parts if str(p) != ""]
        if item in (int, float) and not isinstance(value, list):
            try:
                return tuple(item(p) for p in parts)
            except ValueError:
                kind = "integers" if item is int else "numbers"
                raise UserError(f"{flag} {value!r}: expected comma-separated {kind}") from None
        return tuple(_typed(p, item, flag) for p in parts)
    if inner not in (int, float, str, bool, Path):
        return _typed(value, inner, flag)
    return value


def _typed(text: Any, tp: Any, flag: str) -> Any:
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            raise UserError(f"{flag}: {text!r} is not {kind}") from None
    return coerce(text, tp, flag)


def configured(
    config_cls: type,
    *,
    defaults: Callable[[], Any] | None = None,
    flags: Mapping[str, str] | None = None,
    repeat: Iterable[str] = (),
    arguments: Iterable[str] = (),
    no_flag: Mapping[str, str] | None = None,
    links: Mapping[str, str] | None = None,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    run_dir: bool = True,
    out_optional: bool = False,
    report_to: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a command's options from `config_cls` (see the module doc). `defaults` builds
    the instance whose values are the command's defaults (e.g. couple-marker's coupling
    learning rate); without it the dataclass defaults apply. `links` maps a field with no flag
    of its own to the field whose flag sets it too (couple-marker: `coupling.seed` follows
    `--seed`); a config file sets each separately."""
    links, parsers = dict(links or {}), dict(parsers or {})
    flags, no_flag = dict(flags or {}), dict(no_flag or {})
    for target, src in links.items():
        no_flag.setdefault(target, f"follows {flags.get(src, src)} (set it apart in --config)")
    repeat, arguments = set(repeat), set(arguments)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        tree = leaves(config_cls, defaults() if defaults else None)
        paths = {leaf.path for leaf in tree}
        declared = set(flags) | set(no_flag) | set(links.values()) | set(parsers)
        unknown = (declared | repeat | arguments) - paths
        if unknown:
            raise TypeError(f"{func.__name__}: not fields of {config_cls.__name__}: {unknown}")
        own = inspect.signature(func).parameters
        extra = [p for name, p in own.items() if name not in ("cfg", "out", "force")]
        params: list[inspect.Parameter] = []
        by_param: dict[str, tuple[Leaf, str]] = {}
        seen: dict[str, str] = {}
        first_names: dict[str, str] = {}
        for leaf in tree:
            if leaf.path in no_flag:
                continue
            spec = flags.get(leaf.path)
            if spec is None and leaf.path == leaf.name:  # top-level fields only
                spec = COMMON_FLAGS.get(leaf.name)
            decls = _decls(leaf, spec)
            names = [n for d in decls for n in d.split("/")]
            for n in names:
                if n in seen:
                    raise TypeError(f"{func.__name__}: {n} is both {seen[n]} and {leaf.path}")
                seen[n] = leaf.path
            pname = "opt_" + leaf.path.replace(".", "__")
            repeated = leaf.path in repeat or leaf.path in COMMON_REPEAT
            annotation = _param(leaf, decls, repeated, leaf.path in arguments)
            kind = inspect.Parameter.KEYWORD_ONLY
            default = _cli_default(leaf, repeated)
            params.append(inspect.Parameter(pname, kind, default=default, annotation=annotation))
            first = leaf.name.upper() if leaf.path in arguments else names[0]
            by_param[pname] = (leaf, first)
            first_names[leaf.path] = first
        control = []
        if run_dir:
            out_help = "Run directory to write (config.json, artifacts, manifest.json, DONE)."
            if out_optional:
                out_help = "Also write a run directory (config.json, result, manifest.json, DONE)."
            control.append(
                (
                    "out",
                    Annotated[
                        Path | None,
                        typer.Option(
                            "--out", "-o", help=out_help, metavar="DIR", show_default=False
                        ),
                    ],
                    None,
                )
            )
        control += [
            (
                "config_file",
                Annotated[
                    Path | None,
                    typer.Option(
                        "--config",
                        help="YAML or JSON file of this command's options (keys as in "
                        "--print-config); flags given here override it.",
                        metavar="FILE",
                    ),
                ],
                None,
            ),
            (
                "print_config",
                Annotated[
                    bool,
                    typer.Option(
                        "--print-config",
                        help="Print the resolved options as YAML (a starting --config file) "
                        "and exit.",
                        metavar="",
                    ),
                ],
                False,
            ),
        ]
        if report_to:
            control.append(
                (
                    "report_to",
                    Annotated[
                        str,
                        typer.Option(
                            "--report-to",
                            help="Mirror the run to an experiment tracker: none or wandb "
                            "(config, per-step train log, summary figures; the wandb run id "
                            "and URL go into the manifest). Not part of the run's config.",
                            metavar="none|wandb",
                        ),
                    ],
                    "none",
                )
            )
        if run_dir:
            control.append(
                (
                    "force",
                    Annotated[
                        bool,
                        typer.Option(
                            "--force",
                            help="Redo a finished run: clear --out and start afresh.",
                            metavar="",
                        ),
                    ],
                    False,
                )
            )
        kw = inspect.Parameter.KEYWORD_ONLY
        control_params = [inspect.Parameter(n, kw, default=d, annotation=a) for n, a, d in control]
        extra_params = [p.replace(kind=kw) for p in extra]
        # Positional arguments first (their order is the command line's), then --out, the
        # config's options, the extra ones, --config/--print-config/--force.
        arg_params = [p for p in params if by_param[p.name][0].path in arguments]
        opt_params = [p for p in params if p not in arg_params]
        all_params = arg_params + control_params[:1] + opt_params + extra_params
        all_params += control_params[1:] if run_dir else control_params
        if not run_dir:
            all_params = arg_params + opt_params + extra_params + control_params

        ctx_param = inspect.Parameter(
            "ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        all_params.insert(0, ctx_param)

        @functools.wraps(func)
        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            out = kwargs.pop("out", None)
            force = kwargs.pop("force", False)
            tracker = tracking.tracker_for(kwargs.pop("report_to", "none"))
            config_file = kwargs.pop("config_file")
            print_config = kwargs.pop("print_config")
            given: dict[str, Any] = {}
            for pname, (leaf, flag) in by_param.items():
                value = kwargs.pop(pname)
                source = ctx.get_parameter_source(pname)
                if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                    continue  # not given: the file's or the config's value stands
                parse = parsers.get(leaf.path)
                given[leaf.path] = parse(value) if parse else _from_flag(value, leaf, flag)
            for target, src in links.items():
                if src in given:
                    given[target] = given[src]
            file_values = load_file(config_file) if config_file is not None else None
            base = defaults() if defaults else None
            source = str(config_file) if config_file is not None else "--config"
            if print_config:
                _print_config(config_cls, base, file_values, given, source, first_names)
                raise typer.Exit(0)
            cfg = resolve(
                config_cls,
                base,
                file_values,
                given,
                file_source=source,
                flag_names=first_names,
            )
            with tracking.active(tracker):
                if run_dir:
                    if out is None and not out_optional:
                        raise UserError("missing option '--out' (the run directory to write)")
                    return func(cfg, out=out, force=force, **kwargs)
                return func(cfg, **kwargs)

        del command.__wrapped__  # Typer must see the generated signature, not func's
        command.__doc__ = _paragraphs(func.__doc__ or "")
        command.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in all_params}
        DECLARED[command] = Declaration(
            config_cls, first_names, no_flag, frozenset(arguments), run_dir, defaults
        )
        return command

    return decorate


def _paragraphs(doc: str) -> str:
    """A docstring as --help text: its paragraphs kept, the lines within each joined (rich
    would otherwise break the help at the docstring's own line ends)."""
    parts = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in parts)


def _print_config(
    config_cls: type,
    base: Any,
    file_values: Mapping[str, Any] | None,
    given: Mapping[str, Any],
    source: str,
    flag_names: Mapping[str, str],
) -> None:
    import yaml

    try:
        plain = to_plain(
            resolve(config_cls, base, file_values, given, file_source=source, flag_names=flag_names)
        )
        note = ""
    except UserError as e:
        if not str(e).startswith("missing option"):
            raise
        # A starting file: the defaults (null where a value is required) with what was given.
        plain = defaults_plain(config_cls, base)
        for path, value in given.items():
            node = plain
            *parents, name = path.split(".")
            for p in parents:
                node = node[p]
            node[name] = to_plain(value)
        required = [leaf.path for leaf in leaves(config_cls, base) if leaf.required]
        note = f"# required (null here): {', '.join(required)}\n"
    typer.echo(note + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), nl=False)


def say_already_done(path: Path) -> None:
    err_console.print(
        f"{path}: already finished (DONE present); nothing to do. Pass --force to redo.",
        highlight=False,
    )
