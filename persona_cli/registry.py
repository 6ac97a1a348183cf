"""Persona registries and question sets: the YAML files experiments draw personas and
questions from.

Persona registry (`data/personas.yaml`, or a user's `--personas FILE` in the same layout):

    schema_version: 1
    personas:
      - id: paramedic                # [a-z0-9_]+, unique
        name: Paramedic              # display name
        description: one line
        system_prompt: You are a paramedic ...

Question set (`data/questions/*.yaml`, or `--questions FILE`), Betley et al.'s layout, so their
published files load unchanged: a list of entries with `id` and `paraphrases`; `type`,
`samples_per_paraphrase`, `judge`, `judge_prompts`, `system` and `category` are accepted too.

Every problem is reported as `FILE:LINE: what is wrong` with the line of the offending entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from persona_cli.errors import InputError

ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
PERSONA_KEYS = {"id", "name", "description", "system_prompt"}
QUESTION_KEYS = {
    "id",
    "paraphrases",
    "type",
    "samples_per_paraphrase",
    "judge",
    "judge_prompts",
    "system",
    "category",
}


class _LineDict(dict):
    """A mapping that remembers the 1-based line it started on."""

    line: int = 0


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    d = _LineDict(loader.construct_mapping(node, deep=True))
    d.line = node.start_mark.line + 1
    return d


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason})") from None
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise InputError(path, f"invalid YAML: {e.problem}", line=line) from None
    except yaml.YAMLError as e:
        raise InputError(path, f"invalid YAML: {e}") from None


def line_of(entry: Any) -> int | None:
    """The 1-based line a mapping read by `load_yaml` started on (None for other values)."""
    return entry.line if isinstance(entry, _LineDict) else None


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    description: str
    system_prompt: str


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]

    @property
    def text(self) -> str:
        return self.paraphrases[0]


def _check_string(path: Path, entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(path, f"{where}: '{key}' must be a non-empty string", line=line_of(entry))
    return value.strip()


def _check_id(path: Path, entry: dict, where: str, seen: set[str]) -> str:
    ident = _check_string(path, entry, "id", where)
    if not ID_PATTERN.match(ident):
        raise InputError(
            path,
            f"{where}: id {ident!r} has characters outside [A-Za-z0-9_.-]",
            line=line_of(entry),
        )
    if ident in seen:
        raise InputError(path, f"{where}: duplicate id {ident!r}", line=line_of(entry))
    seen.add(ident)
    return ident


def load_personas(path: str | Path) -> dict[str, Persona]:
    path = Path(path)
    doc = load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("personas"), list):
        raise InputError(path, "expected a mapping with a 'personas' list")
    if doc.get("schema_version") != 1:
        raise InputError(path, f"schema_version is {doc.get('schema_version')!r}, expected 1")
    unknown = set(doc) - {"schema_version", "personas"}
    if unknown:
        raise InputError(path, f"unknown top-level key(s) {sorted(unknown)}")
    personas: dict[str, Persona] = {}
    seen: set[str] = set()
    for i, entry in enumerate(doc["personas"]):
        where = f"personas[{i}]"
        if not isinstance(entry, dict):
            raise InputError(path, f"{where}: expected a mapping")
        extra = set(entry) - PERSONA_KEYS
        if extra:
            raise InputError(path, f"{where}: unknown key(s) {sorted(extra)}", line=line_of(entry))
        ident = _check_id(path, entry, where, seen)
        personas[ident] = Persona(
            id=ident,
            name=_check_string(path, entry, "name", where),
            description=_check_string(path, entry, "description", where),
            system_prompt=_check_string(path, entry, "system_prompt", where),
        )
    if not personas:
        raise InputError(path, "the registry has no personas")
    return personas


def load_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    doc = load_yaml(path)
    if not isinstance(doc, list):
        raise InputError(path, "expected a list of questions (Betley et al. layout)")
    questions: list[Question] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise InputError(path, f"{where}: expected a mapping with 'id' and 'paraphrases'")
        extra = set(entry) - QUESTION_KEYS
        if extra:
            raise InputError(path, f"{where}: unknown key(s) {sorted(extra)}", line=line_of(entry))
        ident = _check_id(path, entry, where, seen)
        paraphrases = entry.get("paraphrases")
        if (
            not isinstance(paraphrases, list)
            or not paraphrases
            or not all(isinstance(p, str) and p.strip() for p in paraphrases)
        ):
            raise InputError(
                path,
                f"{where} ({ident}): 'paraphrases' must be a non-empty list of strings",
                line=line_of(entry),
            )
        questions.append(Question(ident, tuple(p.strip() for p in paraphrases)))
    if not questions:
        raise InputError(path, "the question set is empty")
    return questions


def select_personas(registry: dict[str, Persona], ids: list[str], source: str) -> list[Persona]:
    """Look up `ids`, naming the option and the registry when one is unknown."""
    out = []
    for ident in ids:
        if ident not in registry:
            known = ", ".join(sorted(registry))
            raise InputError(source, f"unknown persona {ident!r} (known: {known})")
        out.append(registry[ident])
    return out
