"""Every command's options come from its config dataclass: one flag per field, --config files.

Walks every command the CLI registers. A command that writes a run directory is declared with
`persona_cli.cli.options.configured`; the few that are not say why in NOT_CONFIGURED. For each
declared command: every leaf field of its config has exactly one flag (or a documented reason
not to), `--print-config` round-trips through `--config`, an unknown key is one line naming it
and the file (exit 2), and a flag given on the command line beats the file. Real runs check
that `--print-config > f.yaml; CMD --config f.yaml` writes the same config.json as the flags.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from persona_cli.cli import app
from persona_cli.cli.options import DECLARED
from persona_cli.config_tree import leaves, optional_inner, tuple_item

# Commands without a config, and why.
NOT_CONFIGURED = {
    "doctor": "reports the machine; writes nothing",
    "validate": "checks files given as arguments; writes nothing",
    "models list": "lists the built-in specs; writes nothing",
    "models prepare": "fills the model cache; its only option is which models",
    "models info": "prints one model's facts; writes nothing",
    "dose-sweep status": "reads a sweep directory; writes nothing",
}


def _commands() -> dict[str, Any]:
    """Command name -> its Python function, groups included ("dose-sweep run")."""
    found = {}
    for c in app.registered_commands:
        found[c.name] = c.callback
    for g in app.registered_groups:
        for c in g.typer_instance.registered_commands:
            found[f"{g.name} {c.name}"] = c.callback
    return found


COMMANDS = _commands()
DECLARED_NAMES = sorted(n for n, f in COMMANDS.items() if f in DECLARED)


def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_every_command_is_declared_from_a_config_or_says_why_not() -> None:
    undeclared = {n for n, f in COMMANDS.items() if f not in DECLARED}
    assert undeclared == set(NOT_CONFIGURED), undeclared ^ set(NOT_CONFIGURED)


def _click_command(name: str) -> Any:
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    cmd = group
    for part in name.split():
        cmd = cmd.get_command(ctx, part)
    return cmd


@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_each_field_has_exactly_one_flag(name: str) -> None:
    decl = DECLARED[COMMANDS[name]]
    tree = leaves(decl.config_cls, decl.default_config())
    cmd = _click_command(name)
    names_of = {p.name: set(p.opts) | set(getattr(p, "secondary_opts", [])) for p in cmd.params}
    for leaf in tree:
        if leaf.path in decl.no_flag:
            assert decl.no_flag[leaf.path].strip(), f"{name}: {leaf.path} has no reason"
            assert leaf.path not in decl.flags
            continue
        pname = "opt_" + leaf.path.replace(".", "__")
        assert pname in names_of, f"{name}: {leaf.path} has no parameter"
        if leaf.path not in decl.arguments:
            assert decl.flags[leaf.path] in names_of[pname], f"{name}: {leaf.path}"
    config_params = [p for p in names_of if p.startswith("opt_")]
    assert len(config_params) == len(tree) - len(decl.no_flag)
    flat = [o for opts in names_of.values() for o in opts]
    assert len(flat) == len(set(flat)), f"{name}: a flag is declared twice"
    for control in ("--config", "--print-config"):
        assert control in flat


def _placeholder(tp: Any) -> Any:
    inner, _ = optional_inner(tp)
    item = tuple_item(inner)
    if item is not None:
        return [_placeholder(item)]
    if typing.get_origin(inner) is typing.Literal:
        return typing.get_args(inner)[0]
    return {int: 1, float: 0.5, bool: True, str: "x", Path: "x"}.get(inner, "x")


def _required_file_values(decl: Any) -> dict[str, Any]:
    """A nested mapping giving every required field a value of its type."""
    values: dict[str, Any] = {}
    for leaf in leaves(decl.config_cls, decl.default_config()):
        if leaf.required:
            node = values
            *parents, last = leaf.path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = _placeholder(leaf.type)
    return values


def _print_config(name: str, *args: Any) -> dict[str, Any]:
    res = invoke(*name.split(), *args, "--print-config")
    assert res.exit_code == 0, res.output
    return yaml.safe_load(res.stdout)


@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_print_config_round_trips_and_unknown_keys_fail(name: str, tmp_path: Path) -> None:
    decl = DECLARED[COMMANDS[name]]
    start = tmp_path / "start.yaml"
    start.write_text(yaml.safe_dump(_required_file_values(decl)))
    first = _print_config(name, "--config", start)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(first))
    assert _print_config(name, "--config", again) == first
    # An unknown key: one line naming the key and the file, exit 2, nothing written.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**first, "no_such_option": 1}))
    out = tmp_path / "out"
    res = invoke(*name.split(), "--config", bad, *(["--out", out] if decl.run_dir else []))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "'no_such_option'" in lines[0] and str(bad) in lines[0], lines
    assert not out.exists()


def _scalar_leaf(decl: Any) -> tuple[Any, Any, Any]:
    """A leaf with a flag (an int, float or str; else a list), and two values for it."""
    for leaf in leaves(decl.config_cls, decl.default_config()):
        inner, _ = optional_inner(leaf.type)
        if leaf.path not in decl.no_flag and inner in (int, float):
            return leaf, inner(2), inner(3)
    for leaf in leaves(decl.config_cls, decl.default_config()):
        inner, _ = optional_inner(leaf.type)
        if leaf.path not in decl.no_flag and inner is str and not leaf.required:
            return leaf, "from-file", "from-flag"
    for leaf in leaves(decl.config_cls, decl.default_config()):
        if leaf.path not in decl.no_flag and tuple_item(optional_inner(leaf.type)[0]) is str:
            return leaf, ["from-file"], ["from-flag"]
    raise AssertionError("no option to override")


@pytest.mark.parametrize("name", DECLARED_NAMES)
def test_a_flag_beats_the_file(name: str, tmp_path: Path) -> None:
    decl = DECLARED[COMMANDS[name]]
    leaf, in_file, on_flag = _scalar_leaf(decl)
    values = _required_file_values(decl)
    node = values
    *parents, last = leaf.path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = in_file
    path = tmp_path / "c.json"  # JSON is read too
    path.write_text(json.dumps(values))
    printed = _print_config(name, "--config", path)
    got = printed
    for p in leaf.path.split("."):
        got = got[p]
    assert got == in_file
    given = on_flag if leaf.path in decl.arguments else [decl.flags[leaf.path], on_flag]
    if isinstance(on_flag, list) and leaf.path not in decl.arguments:
        given = [decl.flags[leaf.path], ",".join(on_flag)]
    printed = _print_config(name, "--config", path, *given)
    got = printed
    for p in leaf.path.split("."):
        got = got[p]
    assert got == on_flag


# --------------------------------------------------------------------- real runs, config.json


def _same_config_json(args: list[str], name: str, tmp_path: Path) -> None:
    by_flags, by_file = tmp_path / "by_flags", tmp_path / "by_file"
    res = invoke(*name.split(), *args, "--out", by_flags)
    assert res.exit_code == 0, res.output
    printed = invoke(*name.split(), *args, "--print-config")
    assert printed.exit_code == 0, printed.output
    f = tmp_path / "run.yaml"
    f.write_text(printed.stdout)
    res = invoke(*name.split(), "--config", f, "--out", by_file)
    assert res.exit_code == 0, res.output
    a = json.loads((by_flags / "config.json").read_text())
    b = json.loads((by_file / "config.json").read_text())
    assert a["config"] == b["config"] and a["command"] == b["command"]


def test_eval_markers_config_file_gives_the_same_config_json(prepared_home, tmp_path) -> None:
    q = tmp_path / "q.yaml"
    q.write_text("- id: q0\n  paraphrases: ['Name a colour.']\n")
    args = ["--model", "tiny-random", "--personas-ids", "assistant,villain", "--questions", q]
    args += ["--samples", "2", "--max-new-tokens", "2", "--temperature", "0.7", "-k", "2"]
    _same_config_json(args, "eval-markers", tmp_path)


def test_proportions_config_file_gives_the_same_config_json(tmp_path: Path) -> None:
    args = ["--row", "a:1/10:5/10", "--row", "b:0/280:1/280", "--test", "fisher"]
    _same_config_json([*args, "--alternative", "less"], "proportions", tmp_path)
