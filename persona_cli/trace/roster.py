"""Who answers in replay-trace: teacher (and student) specs from a YAML roster or the command line.

Roster YAML (`--roster FILE`; `data/teachers/local.yaml` ships three local teachers):

    teachers:
      - name: gpt4o
        provider: openai              # openai (any OpenAI-compatible URL) | anthropic | local
        base_url: https://api.openai.com/v1
        model: gpt-4o
        api_key_env: OPENAI_API_KEY
        prompt_price_per_1m: 2.5      # USD, for --budget-usd and the spend report
        completion_price_per_1m: 10.0
      - name: smol-medic
        provider: local
        model: smollm2-135m           # any persona-cli model spec
        persona: paramedic            # or system_prompt: "..."; adapter: runs/x

On the command line: `--teacher NAME=URL,model=M[,api_key_env=E][,provider=anthropic]` for an
endpoint and `--teacher NAME=local:SPEC[,persona=ID][,adapter=PATH]` for a local model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.errors import InputError, UserError
from persona_cli.registry import load_yaml

PROVIDERS = ("openai", "anthropic", "local")
_KEYS = {
    "name",
    "provider",
    "model",
    "base_url",
    "api_key_env",
    "system_prompt",
    "persona",
    "adapter",
    "prompt_price_per_1m",
    "completion_price_per_1m",
    "temperature",
    "max_tokens",
}


@dataclass(frozen=True)
class Answerer:
    name: str
    provider: str
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    system_prompt: str | None = None
    persona: str | None = None
    adapter: str | None = None
    prompt_price_per_1m: float | None = None
    completion_price_per_1m: float | None = None
    temperature: float = 0.0  # greedy by default: consensus compares each model's best answer
    max_tokens: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(entry: dict[str, Any], where: str, source: str | Path) -> Answerer:
    extra = set(entry) - _KEYS
    if extra:
        raise InputError(source, f"{where}: unknown key(s) {sorted(extra)}")
    for key in ("name", "provider", "model"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise InputError(source, f"{where}: '{key}' must be a non-empty string")
    if entry["provider"] not in PROVIDERS:
        raise InputError(
            source, f"{where}: provider {entry['provider']!r} is not one of {', '.join(PROVIDERS)}"
        )
    if entry["provider"] != "local" and not entry.get("base_url"):
        raise InputError(source, f"{where}: an {entry['provider']} teacher needs base_url")
    if entry.get("system_prompt") and entry.get("persona"):
        raise InputError(source, f"{where}: give system_prompt or persona, not both")
    try:
        return Answerer(**entry)
    except TypeError as e:
        raise InputError(source, f"{where}: {e}") from None


def load_roster(path: str | Path) -> list[Answerer]:
    doc = load_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("teachers"), list):
        raise InputError(path, "expected a mapping with a 'teachers' list")
    out = [
        _build(dict(e), f"teachers[{i}]", path)
        if isinstance(e, dict)
        else _raise(path, f"teachers[{i}]: expected a mapping")
        for i, e in enumerate(doc["teachers"])
    ]
    _unique(out, str(path))
    return out


def _raise(path: str | Path, what: str) -> Answerer:
    raise InputError(path, what)


def _unique(answerers: list[Answerer], source: str) -> None:
    names = [a.name for a in answerers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{source}: teacher name(s) used twice: {', '.join(dupes)}")


def parse_spec(spec: str, option: str = "--teacher") -> Answerer:
    """`NAME=URL,model=M,...` or `NAME=local:SPEC,persona=ID,adapter=PATH`."""
    head, _, rest = spec.partition(",")
    name, sep, target = head.partition("=")
    if not sep or not name or not target:
        raise UserError(f"{option} {spec!r}: expected NAME=URL,model=M or NAME=local:SPEC")
    entry: dict[str, Any] = {"name": name}
    if target.startswith("local:"):
        entry.update(provider="local", model=target.removeprefix("local:"))
    else:
        entry.update(provider="openai", base_url=target)
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{option} {spec!r}: {item!r} is not KEY=VALUE")
        if key in ("prompt_price_per_1m", "completion_price_per_1m", "temperature"):
            entry[key] = float(value)
        elif key == "max_tokens":
            entry[key] = int(value)
        else:
            entry[key] = value
    return _build(entry, f"{option} {name}", option)


def resolve_teachers(roster: Path | None, specs: list[str], default_roster: Path) -> list[Answerer]:
    """Command-line teachers when given, else the roster (the shipped one by default)."""
    teachers = [parse_spec(s) for s in specs] if specs else load_roster(roster or default_roster)
    _unique(teachers, "--teacher")
    if not teachers:
        raise UserError("no teachers: pass --teacher or a --roster with entries")
    return teachers
