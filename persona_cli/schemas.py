"""The schema of each artifact kind, documented once, checked by every reader and by `validate`.

A `RowSchema` lists the fields of one row kind with their types; `check(row)` returns the
problems as short strings (empty list when valid). Readers pass `schema.check` to
`artifacts.iter_jsonl`, so a command reading a file and `persona-cli validate` report the same
`FILE:LINE: problem`. Bump a kind's `version` when its fields change and say so in `doc`.

Kinds:
- `chat`: user-supplied SFT data, `{"messages": [{"role", "content"}, ...]}` (extra keys kept).
- `samples`: one generated completion per row (`samples.jsonl.gz`).
- `step`: one per-sample record of a replayable training or probe step (`step_NNNNNN.jsonl.gz`).
- `manifest`, `config`, `summary`: the JSON documents of a run directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Field:
    name: str
    types: tuple[type, ...]
    required: bool = True
    nullable: bool = False
    check: Check | None = None
    doc: str = ""


@dataclass(frozen=True)
class RowSchema:
    kind: str
    version: int | None  # None: user-supplied input that carries no schema_version
    fields: tuple[Field, ...]
    extra_allowed: bool = False
    doc: str = ""
    row_check: Callable[[dict[str, Any]], list[str]] | None = field(default=None)

    def check(self, row: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        if self.version is not None:
            got = row.get("schema_version")
            if got != self.version:
                problems.append(
                    f"schema_version is {got!r}, expected {self.version} for a {self.kind} row"
                )
        known = {"schema_version"}
        for f in self.fields:
            known.add(f.name)
            if f.name not in row:
                if f.required:
                    problems.append(f"missing field '{f.name}'")
                continue
            value = row[f.name]
            if value is None:
                if not f.nullable:
                    problems.append(f"field '{f.name}' is null")
                continue
            # bool is an int subclass; a count field must not accept True.
            if not isinstance(value, f.types) or (isinstance(value, bool) and bool not in f.types):
                names = " or ".join(t.__name__ for t in f.types)
                problems.append(f"field '{f.name}' must be {names}, got {type(value).__name__}")
                continue
            if f.check is not None and (msg := f.check(value)):
                problems.append(f"field '{f.name}' {msg}")
        if not self.extra_allowed:
            extra = sorted(set(row) - known)
            if extra:
                problems.append(f"unknown field(s) {', '.join(map(repr, extra))}")
        if not problems and self.row_check is not None:
            problems.extend(self.row_check(row))
        return problems


def _non_negative(v: Any) -> str | None:
    return "must be >= 0" if v < 0 else None


def _non_empty(v: Any) -> str | None:
    return "must not be empty" if len(v) == 0 else None


def check_messages(messages: Any) -> str | None:
    """Problems with a chat `messages` list, as one string naming the offending entry."""
    if not isinstance(messages, list):
        return f"must be a list of messages, got {type(messages).__name__}"
    if not messages:
        return "must not be empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"[{i}] must be an object with 'role' and 'content'"
        role = m.get("role")
        if role not in CHAT_ROLES:
            return f"[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"[{i}].content must be a string"
        if role == "system" and i != 0:
            return f"[{i}] a system message may only come first"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        return "the first non-system message must be from the user"
    for a, b in itertools.pairwise(roles):
        if a == b:
            return "user and assistant messages must alternate"
    return None


CHAT = RowSchema(
    kind="chat",
    version=None,
    fields=(
        Field(
            "messages",
            (list,),
            check=check_messages,
            doc="system? then alternating user/assistant turns",
        ),
    ),
    extra_allowed=True,
    doc="SFT conversation. Training takes loss on assistant turns; the last turn should be "
    "the assistant's.",
)

SAMPLES = RowSchema(
    kind="samples",
    version=1,
    fields=(
        Field("persona", (str,), doc="persona id whose system prompt was used"),
        Field("question_id", (str,)),
        Field("question", (str,), doc="the exact user text sent"),
        Field("sample_index", (int,), check=_non_negative),
        Field("text", (str,), doc="the raw completion, untrimmed"),
        Field("n_tokens", (int,), check=_non_negative),
        Field("finish_reason", (str,), nullable=True, doc="'stop', 'length', or null"),
        Field("backend", (str,), doc="'hf' or 'vllm'"),
        Field("seed", (int,)),
        Field("adapter", (str,), required=False, nullable=True),
    ),
    doc="One completion per row; summaries are recomputed from these.",
)

STEP = RowSchema(
    kind="step",
    version=1,
    fields=(
        Field("step", (int,), check=_non_negative),
        Field("sample_index", (int,), check=_non_negative),
    ),
    extra_allowed=True,  # each probe stage adds its own per-sample fields
    doc="One per-sample record of a replayable step, in step_NNNNNN.jsonl.gz.",
)

ROW_SCHEMAS: dict[str, RowSchema] = {s.kind: s for s in (CHAT, SAMPLES, STEP)}

MANIFEST_VERSION = 1
CONFIG_VERSION = 1

# Keys a manifest must carry; `persona_cli.manifest` is the one writer.
MANIFEST_KEYS: tuple[str, ...] = (
    "schema_version",
    "run_id",
    "command",
    "argv",
    "config_sha256",
    "inputs",
    "outputs",
    "model",
    "chat_template",
    "git",
    "packages",
    "python",
    "platform",
    "device",
    "protocol",
    "seeds",
    "timing",
)
CONFIG_KEYS: tuple[str, ...] = ("schema_version", "command", "config")
