"""A frozen config dataclass as a tree of leaf fields: the one place configs meet files and flags.

A command's options are the fields of one frozen dataclass (nested dataclasses allowed, e.g.
`MarkerEvalConfig.generation.temperature`). Each field carries its help text in
`metadata={"help": ...}` and its default; nothing else declares them. This module knows the
tree and nothing about Typer:

- `leaves(cls)`: every leaf field with its dotted path, type, default and help;
- `load_file(path)`: a YAML or JSON config file as a mapping (`FILE:LINE: ...` on a syntax
  error);
- `resolve(cls, defaults, file_values, flag_values, source)`: defaults, then the file's keys,
  then the flags given on the command line, coerced to the field types and built into the
  frozen dataclass; an unknown key, a value of the wrong type or a missing required field is a
  `UserError` naming the file (or the flag) and the key;
- `to_plain(config)`: the config as plain YAML/JSON values (tuples -> lists, paths -> str),
  which is what `--print-config` prints and what a file round-trips through.

    cfg = resolve(MarkerEvalConfig, None, load_file(Path("run.yaml")), {"marker": "[X]"}, ...)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from persona_cli.errors import UserError

REQUIRED = MISSING  # the default of a field the user must give


@dataclass(frozen=True)
class Leaf:
    """One leaf field of a config tree."""

    path: str  # dotted: "generation.temperature"
    type: Any  # the resolved annotation, e.g. float, str | None, tuple[str, ...]
    default: Any  # REQUIRED when the field has none
    help: str

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return REQUIRED


def leaves(cls: type, defaults: Any = None, prefix: str = "") -> list[Leaf]:
    """Every leaf field of `cls` in declaration order; nested config dataclasses are walked.
    `defaults` (an instance, or None for the dataclass defaults) supplies the shown defaults."""
    hints = _hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if is_config(tp):
            nested = default if default is not REQUIRED else None
            out.extend(leaves(tp, nested, f"{prefix}{f.name}."))
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: a config field needs metadata['help']")
        out.append(Leaf(f"{prefix}{f.name}", tp, default, f.metadata["help"]))
    return out


# ----------------------------------------------------------------------------- types


def optional_inner(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def tuple_item(tp: Any) -> Any | None:
    """T for `tuple[T, ...]`, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def type_name(tp: Any) -> str:
    inner, optional = optional_inner(tp)
    item = tuple_item(inner)
    if item is not None:
        name = f"a list of {type_name(item)}"
    elif typing.get_origin(inner) in (dict, Mapping) or inner is dict:
        name = "a mapping"
    else:
        name = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
            inner, "a path" if inner is Path else getattr(inner, "__name__", str(inner))
        )
    return f"{name} or null" if optional else name


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from a YAML/JSON file or a parsed flag) as type `tp`; `where` names it."""
    inner, optional = optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be null (expected {type_name(tp)})")
    item = tuple_item(inner)
    if item is not None:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected {type_name(tp)}, got {value!r}")
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(inner) in (dict, Mapping) or inner is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif inner is Path:
        if isinstance(value, str | Path):
            return Path(value)
    elif typing.get_origin(inner) is typing.Literal:
        if value in typing.get_args(inner):
            return value
    else:
        return value
    raise UserError(f"{where}: expected {type_name(tp)}, got {value!r}")


# ----------------------------------------------------------------------------- files


def load_file(path: Path) -> dict[str, Any]:
    """A YAML (or JSON, which YAML reads too) config file as a mapping."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: not valid YAML/JSON: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file holds a mapping of option keys, not {data!r}")
    return data


def _flatten(values: Mapping[str, Any], cls: type, source: str, prefix: str = "") -> dict:
    """A nested mapping of a file -> {dotted path: value}; unknown keys are an error."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints or key not in names:
            raise UserError(
                f"{source}: unknown key {prefix}{key!r} "
                f"(keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)})"
            )
        tp = hints[key]
        if is_config(tp):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: key {prefix}{key!r}: expected a mapping of its keys")
            out.update(_flatten(value, tp, source, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _build(cls: type, values: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if is_config(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, source, f"{path}.")
        else:
            kwargs[f.name] = values[path]
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        where = f" ({source})" if source != "--config" else ""
        raise UserError(f"{prefix.rstrip('.') or cls.__name__} options: {e}{where}") from None


def resolve(
    cls: type,
    defaults: Any,
    file_values: Mapping[str, Any] | None,
    flag_values: Mapping[str, Any],
    *,
    file_source: str = "--config",
    flag_names: Mapping[str, str] | None = None,
) -> Any:
    """The frozen config: `defaults` (an instance, or None for the dataclass defaults), then
    `file_values` (a nested mapping), then `flag_values` ({dotted path: value} of the flags
    given). A missing required field names its flag (`flag_names`) and the file key."""
    tree = leaves(cls, defaults)
    values = {leaf.path: leaf.default for leaf in tree}
    types_ = {leaf.path: leaf.type for leaf in tree}
    for path, value in _flatten(file_values or {}, cls, file_source).items():
        values[path] = coerce(value, types_[path], f"{file_source}: key {path!r}")
    for path, value in flag_values.items():
        flag = (flag_names or {}).get(path, path)
        values[path] = coerce(value, types_[path], flag)
    missing = [p for p, v in values.items() if v is REQUIRED]
    if missing:
        p = missing[0]
        flag = (flag_names or {}).get(p)
        how = f"{flag} (or key {p!r} in --config)" if flag else f"key {p!r} in --config"
        raise UserError(f"missing option {how}")
    return _build(cls, values, file_source)


def to_plain(value: Any) -> Any:
    """A config (or any value in one) as plain YAML/JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def defaults_plain(cls: type, defaults: Any = None) -> dict[str, Any]:
    """The defaults of `cls` as a nested plain mapping; a required field is None."""
    out: dict[str, Any] = {}
    for leaf in leaves(cls, defaults):
        node = out
        *parents, name = leaf.path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = None if leaf.required else to_plain(leaf.default)
    return out
