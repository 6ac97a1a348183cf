"""Two-proportion tests on counts given directly, for checking a published table.

Each row is two counts, k1 of n1 against k2 of n2, given as `LABEL:k1/n1:k2/n2` or as a line of
a CSV file with the header `label,k1,n1,k2,n2`. Every row is tested with
`stats.two_proportion_test` under one `stats.ComparisonConfig` (test auto, fisher or z; the
alternative, where "less" means rate 1 < rate 2), and the rows' p-values form one family that
`adjust` corrects (none, holm or bonferroni). The counts are taken as given: the tool cannot know
whether they pool several seeds, so each p-value treats the completions as independent.

    persona-cli proportions --csv data/stats/research_log_dose_table.csv --test fisher \\
        --alternative less
    persona-cli proportions --row "dose 375:0/280:1/280" --test fisher --alternative less
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli.artifacts import write_json
from persona_cli.comparison import ADJUST_METHODS, ComparisonConfig
from persona_cli.errors import InputError, UserError
from persona_cli.rundir import is_done, open_run
from persona_cli.schemas import PROPORTIONS

SCHEMA_VERSION = PROPORTIONS.version
RESULT = "proportions.json"
CSV_COLUMNS = ("label", "k1", "n1", "k2", "n2")
ROW_FORMAT = "LABEL:k1/n1:k2/n2"


@dataclass(frozen=True)
class CountRow:
    label: str
    k1: int
    n1: int
    k2: int
    n2: int


@dataclass(frozen=True)
class ProportionsConfig:
    """What `persona-cli proportions` tests; written to its run directory's config.json."""

    rows: tuple[str, ...] = field(
        default=(), metadata={"help": f"{ROW_FORMAT}, e.g. 'dose 25:2/280:75/280'; repeat."}
    )
    csv: str | None = field(
        default=None, metadata={"help": f"CSV file with the columns {','.join(CSV_COLUMNS)}."}
    )
    comparison: ComparisonConfig = field(
        default_factory=ComparisonConfig, metadata={"help": "The test and its alternative."}
    )
    adjust: str = field(
        default="holm",
        metadata={"help": "Family-wise correction over all rows: none, holm or bonferroni."},
    )

    def check(self) -> ProportionsConfig:
        self.comparison.check()
        if self.adjust not in ADJUST_METHODS:
            choices = ", ".join(ADJUST_METHODS)
            raise UserError(f"--adjust {self.adjust!r}: choose one of {choices}")
        if not self.rows and self.csv is None:
            raise UserError(f"no counts: give --row {ROW_FORMAT} (repeatable) or --csv FILE")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": list(self.rows)}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata}


def _whole(name: str, text: str) -> tuple[int | None, str | None]:
    text = text.strip()
    if not text.isdigit():
        return None, f"{name} {text!r} is not a whole number >= 0"
    return int(text), None


def _count_row(label: str, values: dict[str, str]) -> tuple[CountRow | None, str | None]:
    """A checked row, or the first problem with it as one phrase."""
    if not label.strip():
        return None, "the label is empty"
    counts: dict[str, int] = {}
    for name, text in values.items():
        value, problem = _whole(name, text)
        if problem:
            return None, problem
        counts[name] = value
    for k, n in (("k1", "n1"), ("k2", "n2")):
        if counts[n] == 0:
            return None, f"{n} is 0 (an empty group cannot be compared)"
        if counts[k] > counts[n]:
            return None, f"{k} = {counts[k]} exceeds {n} = {counts[n]}"
    return CountRow(label.strip(), **counts), None


def parse_row(spec: str) -> CountRow:
    """`LABEL:k1/n1:k2/n2` (the label may itself hold colons)."""
    parts = spec.rsplit(":", 2)
    pairs = [p.split("/") for p in parts[1:]]
    if len(parts) != 3 or any(len(p) != 2 for p in pairs):
        raise UserError(f"--row {spec!r}: expected {ROW_FORMAT}")
    (k1, n1), (k2, n2) = pairs
    row, problem = _count_row(parts[0], {"k1": k1, "n1": n1, "k2": k2, "n2": n2})
    if problem:
        raise UserError(f"--row {spec!r}: {problem}")
    return row


def read_csv(path: Path) -> list[CountRow]:
    """Rows of a counts CSV; the first problem ends as `FILE:LINE: what is wrong`."""
    if not path.is_file():
        raise InputError(path, "file not found")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(CSV_COLUMNS):
            got = "nothing" if header is None else ",".join(header)
            raise InputError(path, f"the header must be {','.join(CSV_COLUMNS)}, got {got}", 1)
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(CSV_COLUMNS):
                problem = f"expected {len(CSV_COLUMNS)} columns, got {len(record)}"
                raise InputError(path, problem, reader.line_num)
            row, problem = _count_row(
                record[0], dict(zip(CSV_COLUMNS[1:], record[1:], strict=True))
            )
            if problem:
                raise InputError(path, problem, reader.line_num)
            rows.append(row)
    if not rows:
        raise InputError(path, "no rows after the header")
    return rows


def load_rows(config: ProportionsConfig) -> list[CountRow]:
    """The CSV's rows, then the --row ones; labels must be unique."""
    rows = read_csv(Path(config.csv)) if config.csv is not None else []
    rows += [parse_row(spec) for spec in config.rows]
    seen: set[str] = set()
    for row in rows:
        if row.label in seen:
            raise UserError(f"row label {row.label!r} is given twice")
        seen.add(row.label)
    return rows


def compute(config: ProportionsConfig) -> dict[str, Any]:
    """proportions.json: one labelled test record per row and the adjusted p-values."""
    from persona_cli import stats

    config.check()
    rows = load_rows(config)
    cmp = config.comparison
    records = [
        {
            "label": r.label,
            **stats.two_proportion_test(
                r.k1, r.n1, r.k2, r.n2, alternative=cmp.alternative, test=cmp.test
            ).labelled(),
        }
        for r in rows
    ]
    raw = [r["p_value"] for r in records]
    for record, p in zip(records, stats.adjust_family(raw, config.adjust), strict=True):
        record["p_adjusted"] = None if config.adjust == "none" else p
    return {
        "schema_version": SCHEMA_VERSION,
        **cmp.to_dict(),
        "adjustment": {
            "method": config.adjust,
            "adjusts": "p_value",
            "m": sum(p is not None for p in raw),
            "family": "every row",
        },
        "rows": records,
    }


@dataclass
class ProportionsOutcome:
    result: dict[str, Any] | None  # None: the run directory was finished already
    out: Path | None


def run_proportions(
    config: ProportionsConfig, out: Path | None, *, force: bool = False
) -> ProportionsOutcome:
    """Test every row; with `out`, also a run directory holding proportions.json (every row is
    checked before it is created)."""
    if out is not None and is_done(out) and not force:
        return ProportionsOutcome(None, out)
    result = compute(config)
    if out is not None:
        run = open_run(out, command="proportions", config=config.to_dict(), force=force)
        write_json(run.file(RESULT), result)
        run.finish(inputs={} if config.csv is None else {"csv": Path(config.csv)})
    return ProportionsOutcome(result, out)
