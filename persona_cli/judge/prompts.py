"""Judge prompt files: Betley et al.'s YAML layout, validated once, rendered per row.

Two layouts load, so published files work unchanged:

    judge_prompts:                    # a mapping (data/judges/em_judges.yaml)
      aligned: "... {question} ... {answer} ..."
      coherent: "..."

or a Betley et al. question file (a list of entries, each with its own `judge_prompts`); its
entries must then carry the same prompts, since one run applies one prompt per metric.

Metrics are `aligned` and `coherent`; the only placeholders are `{question}` and `{answer}`
(Python format syntax, `{{`/`}}` for literal braces), and `{answer}` is required. Anything else
is a one-line `FILE:LINE: ...` error.

    python -c "from persona_cli.judge.prompts import load_judge_prompts; \
print(load_judge_prompts(None).templates)"
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli.artifacts import sha256_bytes
from persona_cli.errors import InputError
from persona_cli.registry import load_yaml

METRICS = ("aligned", "coherent")
PLACEHOLDERS = ("question", "answer")
DEFAULT_FILE = "em_judges.yaml"


def default_prompts_file() -> Path:
    return bundled.data_dir() / "judges" / DEFAULT_FILE


def _line(node: Any) -> int | None:
    # registry.load_yaml returns mappings that remember their line; lists and strings do not.
    return node.line if hasattr(node, "line") else None


def _check_template(path: Path, metric: str, text: Any, line: int | None) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(path, f"judge_prompts.{metric} must be a non-empty string", line=line)
    names = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:  # a lone "{" or "}"
        raise InputError(
            path, f"judge_prompts.{metric}: {e} (write {{{{ and }}}} for literal braces)", line=line
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise InputError(
                path,
                f"judge_prompts.{metric}: unknown placeholder {{{name}}} "
                f"(allowed: {{question}}, {{answer}})",
                line=line,
            )
        if spec or conversion:
            raise InputError(
                path,
                f"judge_prompts.{metric}: placeholder {{{name}}} takes no format spec or "
                "conversion",
                line=line,
            )
        names.add(name)
    if "answer" not in names:
        raise InputError(path, f"judge_prompts.{metric}: has no {{answer}} placeholder", line=line)
    return text


def _check_mapping(path: Path, prompts: Any, line: int | None) -> dict[str, str]:
    if not isinstance(prompts, dict) or not prompts:
        raise InputError(path, "judge_prompts must be a mapping of metric -> prompt", line=line)
    for key in prompts:
        if key not in METRICS:
            raise InputError(
                path,
                f"judge_prompts: unknown key {key!r} (metrics: {', '.join(METRICS)})",
                line=line,
            )
    return {m: _check_template(path, m, prompts[m], line) for m in METRICS if m in prompts}


@dataclass(frozen=True)
class JudgePrompts:
    """The prompt of each metric and the file they came from."""

    path: Path
    templates: dict[str, str]  # metric -> template

    def render(self, metric: str, question: str, answer: str) -> str:
        return self.templates[metric].format(question=question, answer=answer)

    def template_sha256(self, metric: str) -> str:
        """Hash of one metric's template text, recorded on every judgment row."""
        return sha256_bytes(self.templates[metric].encode())

    def select(self, metrics: tuple[str, ...]) -> JudgePrompts:
        missing = [m for m in metrics if m not in self.templates]
        if missing:
            raise InputError(
                self.path,
                f"judge_prompts has no {', '.join(missing)} prompt (has: "
                f"{', '.join(self.templates)})",
            )
        return JudgePrompts(self.path, {m: self.templates[m] for m in metrics})


def load_judge_prompts(path: str | Path | None) -> JudgePrompts:
    """Read and check a judge prompt file (default: data/judges/em_judges.yaml)."""
    path = Path(path) if path is not None else default_prompts_file()
    doc = load_yaml(path)
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"judge_prompts"})
        if unknown:
            raise InputError(
                path,
                f"unknown top-level key(s) {', '.join(map(repr, unknown))} "
                "(expected judge_prompts)",
                line=_line(doc),
            )
        if "judge_prompts" not in doc:
            raise InputError(path, "missing key 'judge_prompts'", line=_line(doc))
        return JudgePrompts(path, _check_mapping(path, doc["judge_prompts"], _line(doc)))
    if isinstance(doc, list) and doc:
        found: dict[str, str] | None = None
        first_id = None
        for entry in doc:
            if not isinstance(entry, dict) or "judge_prompts" not in entry:
                raise InputError(path, "question entry without judge_prompts", line=_line(entry))
            prompts = _check_mapping(path, entry["judge_prompts"], _line(entry))
            if found is None:
                found, first_id = prompts, entry.get("id")
            elif prompts != found:
                raise InputError(
                    path,
                    f"entry {entry.get('id')!r} has judge_prompts different from entry "
                    f"{first_id!r}; one run uses one prompt per metric",
                    line=_line(entry),
                )
        assert found is not None
        return JudgePrompts(path, found)
    raise InputError(
        path, "expected a mapping with judge_prompts, or a list of questions with judge_prompts"
    )
