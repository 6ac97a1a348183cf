"""`persona-cli validate`: check datasets and artifacts against their schemas.

The kind is read from the file name (override with `kind=`): `manifest.json`, `config.json`,
`summary.json`, `samples*.jsonl[.gz]`, `judgments*`, `train_log*`, `pairs*.jsonl[.gz]` (DPO
pairs), `step_NNNNNN.jsonl[.gz]`, other `*.jsonl[.gz]` (chat data), `*.yaml` (a persona
registry when it has a `personas` key, else a question set). A run directory is checked whole:
config, manifest, DONE, every artifact, and the output hashes the manifest recorded. The row
checks are the same ones every command applies when it reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from persona_cli.artifacts import iter_jsonl_lines, read_json, sha256_file
from persona_cli.errors import InputError
from persona_cli.protocol import run_fields
from persona_cli.registry import load_personas, load_questions, load_yaml
from persona_cli.schemas import (
    CONFIG,
    CONFIG_KEYS,
    CONFIG_VERSION,
    DONE,
    MANIFEST,
    MANIFEST_KEYS,
    MANIFEST_VERSIONS_READ,
    ROW_SCHEMAS,
)

DOCUMENT_KINDS = ("personas", "questions", "manifest", "config", "summary", "run")
KINDS = (*ROW_SCHEMAS, *DOCUMENT_KINDS)
STEP_NAME = re.compile(r"^step_\d{6}\.jsonl(\.gz)?$")
# Row artifacts recognised by name; the prefix is the kind (samples.jsonl.gz, judgments_x...).
NAMED_ROW_KINDS = ("samples", "judgments", "train_log", "pairs")


def artifact_kind(path: Path) -> str | None:
    """The row kind of a file a command wrote, from its name; None when it has no schema."""
    name = path.name
    if STEP_NAME.match(name):
        return "step"
    if ".jsonl" in name:
        return next((k for k in NAMED_ROW_KINDS if name.startswith(k) and k in ROW_SCHEMAS), None)
    return None


@dataclass
class ValidationReport:
    path: Path
    kind: str
    items: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def detect_kind(path: Path) -> str:
    name = path.name
    if path.is_dir():
        return "run"
    if name == MANIFEST:
        return "manifest"
    if name == CONFIG:
        return "config"
    if name.endswith("summary.json"):
        return "summary"
    if (kind := artifact_kind(path)) is not None:
        return kind
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "chat"  # a dataset the user brings
    if name.endswith((".yaml", ".yml")):
        doc = load_yaml(path)
        return "personas" if isinstance(doc, dict) and "personas" in doc else "questions"
    raise InputError(
        path, f"cannot tell the file's kind from its name; pass --kind ({', '.join(KINDS)})"
    )


def _rows(report: ValidationReport, kind: str, max_problems: int) -> None:
    schema = ROW_SCHEMAS[kind]
    for lineno, row, problem in iter_jsonl_lines(report.path):
        problems = [problem] if problem is not None else schema.check(row)  # type: ignore[arg-type]
        if problem is None:
            report.items += 1
        for p in problems:
            report.problems.append(f"{report.path}:{lineno}: {p}")
        if len(report.problems) >= max_problems:
            report.problems.append(f"{report.path}: stopped after {max_problems} problems")
            return
    if report.items == 0 and not report.problems:
        report.problems.append(f"{report.path}: no rows")


def _document(
    report: ValidationReport, keys: tuple[str, ...], version: int | tuple[int, ...] | None
) -> dict:
    doc = read_json(report.path)
    if not isinstance(doc, dict):
        report.problems.append(f"{report.path}: expected a JSON object")
        return {}
    missing = [k for k in keys if k not in doc]
    if missing:
        report.problems.append(f"{report.path}: missing key(s) {', '.join(missing)}")
    versions = (version,) if isinstance(version, int) else version
    if versions is not None and doc.get("schema_version") not in versions:
        expected = " or ".join(map(str, versions))
        report.problems.append(
            f"{report.path}: schema_version is {doc.get('schema_version')!r}, expected {expected}"
        )
    report.items = 1
    return doc


def _run(report: ValidationReport, max_problems: int) -> None:
    d = report.path
    for needed in (CONFIG, MANIFEST, DONE):
        if not (d / needed).is_file():
            report.problems.append(f"{d}: missing {needed} (run unfinished or not a run dir)")
    if not (d / CONFIG).is_file():
        return
    sub = [validate_file(d / CONFIG, max_problems=max_problems)]
    if (d / MANIFEST).is_file():
        sub.append(validate_file(d / MANIFEST, max_problems=max_problems))
        manifest = read_json(d / MANIFEST)
        for rel, digest in sorted(manifest.get("outputs", {}).items()):
            p = d / rel
            if not p.is_file():
                report.problems.append(f"{p}: listed in the manifest but missing")
            elif sha256_file(p) != digest:
                report.problems.append(f"{p}: sha256 differs from the manifest (file changed)")
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith(".") and p.name not in (CONFIG, MANIFEST, DONE):
            kind = artifact_kind(p)
            if kind is None and p.name.endswith("summary.json"):
                kind = "summary"
            if kind is not None:  # tensors, plots, caches and rows with no schema are skipped
                sub.append(validate_file(p, kind, max_problems=max_problems))
    for s in sub:
        report.items += s.items
        report.problems.extend(s.problems)


def validate_file(path: str | Path, kind: str | None = None, max_problems: int = 20):
    """Check one file (or run directory); problems come back as `FILE[:LINE]: what is wrong`."""
    path = Path(path)
    if not path.exists():
        return ValidationReport(path, kind or "?", problems=[f"{path}: file not found"])
    try:
        kind = kind or detect_kind(path)
        if kind not in KINDS:
            raise InputError(path, f"--kind {kind!r}: choose from {', '.join(KINDS)}")
        report = ValidationReport(path, kind)
        if kind in ROW_SCHEMAS:
            _rows(report, kind, max_problems)
        elif kind == "personas":
            report.items = len(load_personas(path))
        elif kind == "questions":
            report.items = len(load_questions(path))
        elif kind == "manifest":
            doc = _document(report, MANIFEST_KEYS, MANIFEST_VERSIONS_READ)
            if not report.problems:  # a schema-2 protocol holds guarded fields only
                run_fields(path.parent, doc)
        elif kind == "config":
            _document(report, CONFIG_KEYS, CONFIG_VERSION)
        elif kind == "summary":
            _document(report, ("schema_version",), None)
        else:
            _run(report, max_problems)
    except InputError as e:
        return ValidationReport(path, kind or "?", problems=[str(e)])
    return report
