"""What a judge scores: (question, answer) items read from samples, JSONL or CSV.

- a `samples.jsonl.gz` written by a generation command (or its run directory): checked against
  `schemas.SAMPLES`; the answer is the `text` field, persona and question id are kept;
- any other JSONL (gzipped or not) or a CSV file with a question and an answer column (names
  configurable; an optional id column and a `persona` column are kept when present).

A samples file is recognised by its content (rows carrying `schema_version`), not its name.
Problems are `FILE:LINE: what is wrong`; an input without rows is an error.

    python -c "from persona_cli.judge.inputs import load_items; print(load_items('RUN')[:1])"
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl, iter_jsonl_lines
from persona_cli.errors import InputError
from persona_cli.schemas import SAMPLES

SAMPLES_FILE = "samples.jsonl.gz"


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge. `row_index` (the input line or CSV record, from 1) is unique."""

    row_index: int
    sample_key: str  # persona/question_id/sample_index for samples; the id column or row index
    question: str
    answer: str
    persona: str | None = None
    question_id: str | None = None
    sample_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Columns:
    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    persona: str = "persona"


def resolve_input(path: str | Path) -> Path:
    """A run directory stands for its samples.jsonl.gz."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
        if not p.is_file():
            raise InputError(p, "file not found (a run directory must hold samples.jsonl.gz)")
    elif not p.exists():
        raise InputError(p, "file not found")
    return p


def _is_samples(path: Path) -> bool:
    for _, row, _ in iter_jsonl_lines(path):
        return row is not None and "schema_version" in row
    return False


def _from_samples(path: Path) -> list[JudgeItem]:
    items = []
    for i, row in enumerate(iter_jsonl(path, SAMPLES.check), start=1):
        key = f"{row['persona']}/{row['question_id']}/{row['sample_index']}"
        items.append(
            JudgeItem(
                row_index=i,
                sample_key=key,
                question=row["question"],
                answer=row["text"],
                persona=row["persona"],
                question_id=row["question_id"],
                sample_index=row["sample_index"],
            )
        )
    return items


def _item(path: Path, line: int, row: dict[str, Any], cols: Columns) -> JudgeItem:
    wanted = [cols.question, cols.answer] + ([cols.id] if cols.id else [])
    for name in wanted:
        if name not in row or row[name] is None:
            have = ", ".join(map(repr, list(row)[:8]))
            raise InputError(path, f"missing column {name!r} (columns: {have})", line=line)
    for name in (cols.question, cols.answer):
        if not isinstance(row[name], str):
            raise InputError(
                path, f"column {name!r} must be a string, got {type(row[name]).__name__}", line=line
            )
    persona = row.get(cols.persona)
    if persona is not None and not isinstance(persona, str):
        raise InputError(path, f"column {cols.persona!r} must be a string", line=line)
    return JudgeItem(
        row_index=line,
        sample_key=str(row[cols.id]) if cols.id else f"row{line}",
        question=row[cols.question],
        answer=row[cols.answer],
        persona=persona or None,
        question_id=None,
        sample_index=None,
    )


def _from_jsonl(path: Path, cols: Columns) -> list[JudgeItem]:
    items = []
    for line, row, problem in iter_jsonl_lines(path):
        if problem is not None:
            raise InputError(path, problem, line=line)
        assert row is not None
        items.append(_item(path, line, row, cols))
    return items


def _from_csv(path: Path, cols: Columns) -> list[JudgeItem]:
    items = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                # line_num is where the record ended; a quoted answer may span several lines.
                items.append(_item(path, reader.line_num, row, cols))
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise InputError(path, f"invalid CSV: {e}") from None
    return items


def load_items(path: str | Path, columns: Columns | None = None) -> list[JudgeItem]:
    """Every item of the input, in file order; raises InputError on bad or empty input."""
    cols = columns or Columns()
    p = resolve_input(path)
    if p.suffix.lower() == ".csv":
        items = _from_csv(p, cols)
    elif _is_samples(p):
        items = _from_samples(p)
    else:
        items = _from_jsonl(p, cols)
    if not items:
        raise InputError(p, "no rows to judge")
    keys = [i.row_index for i in items]
    assert len(set(keys)) == len(keys), "row indices are unique by construction"
    return items
