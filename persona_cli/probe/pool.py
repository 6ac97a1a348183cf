"""Teacher-pool rows: read them (pool run directories, step files, pairs files) and write them.

A pool is a run directory of `step_NNNNNN.jsonl.gz` files whose rows follow
`persona_cli.schemas.POOL_STEP` (stage "pool": prompt, completion, sandbox labels `hacked`,
`gt_pass`, `reward`, token counts). `pool_rows` turns completions into such rows by running them
through the real sandbox: `probe teacher-pool` (persona_cli.probe.teacher_pool) calls it on a
teacher's samples, the tests and a hand-made pool on written ones. extract-vhack also takes a
pairs JSONL (`schemas.VHACK_PAIRS`: prompt, hack, clean), read by `read_pairs`.

    steps = read_pool("runs/pool")            # {step: [row, ...]} in step order
    rows = pool_rows(problems, completions, step=0, prompt_of=render)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl, sha256_file, write_jsonl
from persona_cli.errors import InputError
from persona_cli.problems import Problem
from persona_cli.schemas import POOL_STEP, VHACK_PAIRS

STEP_FILE = re.compile(r"^step_(\d{6})\.jsonl\.gz$")


def step_name(step: int) -> str:
    return f"step_{step:06d}.jsonl.gz"


def step_files(path: Path) -> dict[int, Path]:
    """{step: file} of a run directory, or of one step file."""
    if path.is_file():
        m = STEP_FILE.match(path.name)
        if not m:
            raise InputError(path, "not a step_NNNNNN.jsonl.gz file")
        return {int(m.group(1)): path}
    if not path.is_dir():
        raise InputError(path, "no such pool directory or step file")
    found = {int(m.group(1)): p for p in path.iterdir() if (m := STEP_FILE.match(p.name))}
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class SourceRow:
    """One labelled completion, with where it came from."""

    file: str
    line: int
    step: int
    sample_index: int
    problem_id: str
    prompt: str
    completion: str
    hacked: bool
    gt_pass: bool
    reward: float
    old_logprobs: tuple[float, ...] | None = None


def read_pool(path: str | Path) -> dict[int, list[SourceRow]]:
    """Every pool row, schema-checked, grouped by step (ascending). Refuses an empty pool."""
    path = Path(path)
    files = step_files(path)
    if not files:
        raise InputError(path, "no step_NNNNNN.jsonl.gz files (is this a teacher-pool run?)")
    steps: dict[int, list[SourceRow]] = {}
    for step, file in files.items():
        rows = []
        for line, row in enumerate(iter_jsonl(file, POOL_STEP.check), start=1):
            if row["step"] != step:
                raise InputError(file, f"row has step {row['step']}, file is step {step}", line)
            rows.append(
                SourceRow(
                    file=str(file),
                    line=line,
                    step=step,
                    sample_index=row["sample_index"],
                    problem_id=row["problem_id"],
                    prompt=row["prompt"],
                    completion=row["completion"],
                    hacked=row["hacked"],
                    gt_pass=row["gt_pass"],
                    reward=float(row["reward"]),
                    old_logprobs=tuple(row["old_logprobs"]) if row.get("old_logprobs") else None,
                )
            )
        steps[step] = rows
    return steps


def read_pairs(path: str | Path) -> list[SourceRow]:
    """A pairs JSONL as hack and clean rows (step 0; sample_index 2i hack, 2i+1 clean)."""
    path = Path(path)
    out = []
    for i, row in enumerate(iter_jsonl(path, VHACK_PAIRS.check)):
        pid = row.get("problem_id") or f"pair{i}"
        for j, (text, hacked) in enumerate(((row["hack"], True), (row["clean"], False))):
            out.append(
                SourceRow(
                    str(path), i + 1, 0, 2 * i + j, pid, row["prompt"], text, hacked, False, 0.0
                )
            )
    return out


def source_hashes(rows: Sequence[SourceRow]) -> dict[str, str]:
    """sha256 of every file the rows came from."""
    return {f: sha256_file(f) for f in sorted({r.file for r in rows})}


def pool_rows(
    problems: Sequence[Problem],
    completions: Sequence[str],
    *,
    step: int,
    prompt_of: Callable[[Problem], str],
    count_tokens: Callable[[str], int],
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Pool rows for `completions[i]` answering `problems[i]`, labelled by the real sandbox.

    `progress(1)` is called as each completion's grading finishes.
    """
    from persona_cli.sandbox import GradeItem, run_batch

    if len(problems) != len(completions):
        raise ValueError("one problem per completion")
    items = [
        GradeItem(p, c, item_id=f"{step}:{i}")
        for i, (p, c) in enumerate(zip(problems, completions, strict=True))
    ]
    rows = []
    results = run_batch(items, workers=workers, progress=progress)
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        prompt = prompt_of(item.problem)
        rows.append(
            {
                "step": step,
                "sample_index": i,
                "stage": "pool",
                "problem_id": item.problem.id,
                "prompt": prompt,
                "completion": item.completion,
                "hacked": result.hacked,
                "gt_pass": result.gt_pass,
                "reward": result.reward,
                "n_prompt_tokens": count_tokens(prompt),
                "n_completion_tokens": count_tokens(item.completion),
                "category_strict": result.category_strict,
                "category_loose": result.category_loose,
                "tamper_reasons": list(result.tamper_reasons),
                "sandbox_reason": result.reason,
            }
        )
    return rows


def write_pool_step(directory: str | Path, step: int, rows: Sequence[dict[str, Any]]) -> Path:
    """Write one pool step file atomically (rows must follow POOL_STEP)."""
    path = Path(directory) / step_name(step)
    for row in rows:
        problems = POOL_STEP.check({"schema_version": POOL_STEP.version, **row})
        if problems:
            raise ValueError(f"pool row {row.get('sample_index')}: {problems[0]}")
    write_jsonl(path, rows, schema_version=POOL_STEP.version)
    return path
