"""Adapter sets: several adapter stacks evaluated by one eval-markers invocation.

A set is a name, an adapter stack (possibly empty: the base model) and, optionally, its own run
directory and seed. Given on the command line as `--adapter-set NAME=SPEC[,SPEC..]` (repeatable;
`NAME=` is the base model) or in a file (`--adapter-sets FILE`, YAML or JSON):

    - name: coupling
      adapters: [runs/couple]
    - name: em_d25
      adapters: [runs/couple, runs/dose/em@step_25]
      out: cells/em_d0025_s42/eval      # relative to --out; default: NAME
      seed: 42                          # default: --seed

Each set becomes an ordinary eval-markers run directory, `OUT/NAME` (or `OUT/<out>`): the same
files and manifest a run of that stack alone writes (`persona_cli.eval.markers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from persona_cli.errors import InputError, UserError
from persona_cli.registry import line_of, load_yaml

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KEYS = {"name", "adapters", "out", "seed"}


@dataclass(frozen=True)
class AdapterSet:
    """One stack of an adapter-set evaluation."""

    name: str = field(metadata={"help": "Names the set; its run directory is OUT/NAME."})
    adapters: tuple[str, ...] = field(
        default=(), metadata={"help": "Adapter specs, in training order (empty: the base)."}
    )
    out: str | None = field(
        default=None, metadata={"help": "Run directory relative to --out (default: NAME)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Sampling seed (default: --seed)."})

    def run_dir(self, out: Path) -> Path:
        return out / (self.out or self.name)


def parse_option(text: str) -> AdapterSet:
    """`NAME=SPEC[,SPEC..]` (`NAME=`: no adapters)."""
    name, sep, specs = text.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise UserError(
            f"--adapter-set {text!r}: expected NAME=RUN[,RUN..] with NAME of letters, digits, "
            "'_', '.', '-'"
        )
    return AdapterSet(name, tuple(s.strip() for s in specs.split(",") if s.strip()))


def load_file(path: str | Path) -> list[AdapterSet]:
    """A YAML or JSON list of {name, adapters, out?, seed?} (module doc)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, list) or not data:
        raise InputError(path, "expected a non-empty list of adapter sets")
    sets = []
    for i, entry in enumerate(data):
        where = f"entry {i + 1}"
        if not isinstance(entry, dict):
            raise InputError(path, f"{where}: expected a mapping", line=line_of(entry))
        unknown = sorted(set(entry) - _KEYS)
        if unknown or "name" not in entry:
            what = f"unknown key(s) {unknown}" if unknown else "'name' missing"
            raise InputError(path, f"{where}: {what} (keys: {sorted(_KEYS)})", line=line_of(entry))
        name, adapters = entry["name"], entry.get("adapters", [])
        out, seed = entry.get("out"), entry.get("seed")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(path, f"{where}: bad name {name!r}", line=line_of(entry))
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise InputError(path, f"{where}: 'adapters' must be a list of specs", line_of(entry))
        if out is not None and (not isinstance(out, str) or Path(out).is_absolute()):
            raise InputError(path, f"{where}: 'out' must be a relative path", line_of(entry))
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(path, f"{where}: 'seed' must be an integer", line_of(entry))
        sets.append(AdapterSet(name, tuple(adapters), out, seed))
    return sets


def check_sets(sets: list[AdapterSet], out: Path, source: str = "--adapter-set") -> None:
    """Names and run directories must be distinct."""
    names = [s.name for s in sets]
    dirs = [s.run_dir(out).resolve() for s in sets]
    for label, values in (("name", names), ("run directory", dirs)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{source}: repeated {label} {repeated[0]}")
