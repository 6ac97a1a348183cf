"""Prompt sets for replay-trace, with the task type that decides how answers are normalised.

Accepted files (`--prompts FILE`):
- JSONL of `{"id", "prompt", "task"?, "domain"?, "persona"?}` (task: mc | number | code | free,
  default free; domain default "default"; persona: the student answers under that persona);
- a multiple-choice JSONL in the `allenai/ai2_arc` fields (task mc, domain "mcq"), shown as in
  eval-capability;
- a question set YAML in the Betley et al. layout (task free, domain "questions").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl_lines
from persona_cli.capability import load_items, prompt_text
from persona_cli.errors import InputError
from persona_cli.registry import load_questions
from persona_cli.trace.normalize import TASKS

_KEYS = {"id", "prompt", "task", "domain", "persona", "schema_version"}


@dataclass(frozen=True)
class TracePrompt:
    id: str
    text: str
    task: str
    domain: str
    persona: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(row: dict[str, Any]) -> list[str]:
    if not isinstance(row.get("id"), str | int) or not isinstance(row.get("prompt"), str):
        return ["needs 'id' and a string 'prompt'"]
    if row.get("task", "free") not in TASKS:
        return [f"task {row['task']!r} is not one of {', '.join(TASKS)}"]
    extra = set(row) - _KEYS
    return [f"unknown field(s) {sorted(extra)}"] if extra else []


def load_prompts(path: str | Path, task: str | None = None, limit: int | None = None):
    """The prompts of `path`; `task` overrides every prompt's task type."""
    path = Path(path)
    if task is not None and task not in TASKS:
        raise InputError(path, f"--task {task!r} is not one of {', '.join(TASKS)}")
    if path.suffix in (".yaml", ".yml"):
        out = [TracePrompt(q.id, q.text, task or "free", "questions") for q in load_questions(path)]
    else:
        first = next((row for _, row, _ in iter_jsonl_lines(path) if row is not None), None)
        if first is not None and "choices" in first:
            out = [
                TracePrompt(it.id, prompt_text(it), task or "mc", "mcq")
                for it in load_items(str(path))
            ]
        else:
            out = []
            for lineno, row, problem in iter_jsonl_lines(path):
                problem = problem or next(iter(_check(row)), None)  # type: ignore[arg-type]
                if problem is not None:
                    raise InputError(path, problem, line=lineno)
                out.append(
                    TracePrompt(
                        str(row["id"]),
                        row["prompt"],
                        task or row.get("task", "free"),
                        row.get("domain", "default"),
                        row.get("persona"),
                    )
                )
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise InputError(path, "prompt ids must be unique")
    out = out[:limit]
    if not out:
        raise InputError(path, "no prompts")
    return out
