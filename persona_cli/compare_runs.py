"""`stats`, `compare` and `report` as run directories: configs, the runs, their results.

Each reads finished run directories, checks every input and the protocol guard
(`persona_cli.guard`, exit 3 on a refused difference) before `--out` exists, so a refused or
failed call leaves nothing behind; then writes its result file and finishes the run.

    stats.json     per condition: n seeds, mean, std, t-based CI, per-seed values
    compare.json   + compare.md: Welch tests and Cohen's d against a reference, Holm/Bonferroni
    report.md      + PNGs: from stats/compare runs

The numbers come from `persona_cli.compare` and `persona_cli.stats` (imported when a run starts:
scipy and statsmodels are not needed for `--help`).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli import fields
from persona_cli.artifacts import write_bytes_atomic, write_json
from persona_cli.config_tree import to_plain
from persona_cli.errors import UserError
from persona_cli.fields import option
from persona_cli.rundir import RunDir, is_done, open_run
from persona_cli.schemas import COMPARE_RESULT, REPORT_FILE, STATS_RESULT, STATS_VERSION

_CONDITIONS = "NAME=GLOB of finished run directories, one per seed; repeat per condition."
_METRIC = "Dotted path into each run's summary.json, e.g. source.rate."
_ALPHA = "1 - confidence level of the intervals."


@dataclass(frozen=True)
class StatsConfig:
    """stats: a multi-seed summary per condition."""

    conditions: tuple[str, ...] = option(help=_CONDITIONS)
    metric: str = option(help=_METRIC)
    alpha: float = option(0.05, _ALPHA)
    allow_diff: tuple[str, ...] = fields.allow_diff()


@dataclass(frozen=True)
class CompareConfig:
    """compare: every condition against a reference condition."""

    conditions: tuple[str, ...] = option(help=_CONDITIONS)
    metric: str = option(help=_METRIC)
    reference: str = option(help="Condition the others are compared against.")
    alpha: float = option(0.05, _ALPHA)
    allow_diff: tuple[str, ...] = fields.allow_diff()


@dataclass(frozen=True)
class ReportConfig:
    """report: a Markdown report with PNG figures from stats/compare runs."""

    runs: tuple[str, ...] = option(help="stats or compare run directories.")
    title: str = option("persona-cli report", "Report heading.")
    allow_diff: tuple[str, ...] = fields.allow_diff()


@dataclass
class CompareOutcome:
    """What a stats/compare/report call did: `run` is None when it was already finished."""

    out: Path
    result: dict[str, Any] | None = None
    markdown: str | None = None
    figures: list[Path] = field(default_factory=list)
    already_done: bool = False

    @property
    def allowed_differences(self) -> list[dict[str, Any]]:
        return (self.result or {}).get("allowed_differences", [])


def parse_conditions(specs: tuple[str, ...]) -> dict[str, list[Path]]:
    """`NAME=GLOB` specs -> the finished-or-not run directories each glob matches, in order."""
    out: dict[str, list[Path]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise UserError(f"--condition {spec!r}: expected NAME=GLOB")
        if name in out:
            raise UserError(f"--condition {name}: given twice")
        out[name] = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
    return out


def _summary_inputs(conditions: dict[str, list[Path]]) -> dict[str, Path]:
    """Each run's summary (summary.json, or a training run's train_summary.json) by label."""
    from persona_cli import compare as compare_lib

    return {f"{n}:{p}": compare_lib.summary_file(p) for n, ps in conditions.items() for p in ps}


def _finished(out: Path, force: bool) -> bool:
    return not force and is_done(out)


def _open(out: Path, command: str, cfg: Any, force: bool) -> RunDir:
    return open_run(out, command=command, config=to_plain(cfg), force=force)


def run_stats(cfg: StatsConfig, out: Path, *, force: bool = False) -> CompareOutcome:
    """Multi-seed summary per condition (runs within a condition share their protocol)."""
    from persona_cli import compare as compare_lib

    if _finished(out, force):
        return CompareOutcome(out, already_done=True)
    conditions = parse_conditions(cfg.conditions)
    result = compare_lib.seed_stats(
        compare_lib.collect(conditions, cfg.metric), alpha=cfg.alpha, allow_diff=set(cfg.allow_diff)
    )
    run = _open(out, "stats", cfg, force)
    write_json(
        run.file(STATS_RESULT), {"schema_version": STATS_VERSION, "metric": cfg.metric, **result}
    )
    run.finish(inputs=_summary_inputs(conditions))
    return CompareOutcome(out, result)


def run_compare(cfg: CompareConfig, out: Path, *, force: bool = False) -> CompareOutcome:
    """Welch tests and Cohen's d against `cfg.reference`, Bonferroni and Holm corrected."""
    from persona_cli import compare as compare_lib

    if _finished(out, force):
        return CompareOutcome(out, already_done=True)
    conditions = parse_conditions(cfg.conditions)
    points = compare_lib.collect(conditions, cfg.metric)
    result = compare_lib.compare(
        points, reference=cfg.reference, alpha=cfg.alpha, allow_diff=set(cfg.allow_diff)
    )
    run = _open(out, "compare", cfg, force)
    table = compare_lib.markdown_table(result, cfg.metric)
    write_json(
        run.file(COMPARE_RESULT),
        {"schema_version": compare_lib.RESULT_VERSION, "metric": cfg.metric, **result},
    )
    allowed = "".join(
        f"\n- allowed difference (--allow-diff): {d['field']}: {d['values']}"
        for d in result["allowed_differences"]
    )
    write_bytes_atomic(
        run.file("compare.md"),
        (f"# {cfg.metric}\n\n{table}\n{result['cohens_d_convention']}.\n{allowed}\n").encode(),
    )
    run.finish(inputs=_summary_inputs(conditions))
    return CompareOutcome(out, result, markdown=table)


def run_report(cfg: ReportConfig, out: Path, *, force: bool = False) -> CompareOutcome:
    """report.md with a bar chart and a paired plot per input; every input is read and guarded
    before --out is created."""
    from persona_cli import report as report_lib

    if _finished(out, force):
        return CompareOutcome(out, already_done=True)
    runs = [Path(r) for r in cfg.runs]
    report_lib.guard_sources(runs, set(cfg.allow_diff))
    config = {
        "runs": [str(r) for r in runs],
        "title": cfg.title,
        "allow_diff": sorted(cfg.allow_diff),
    }
    run = open_run(out, command="report", config=config, force=force)
    text, figures = report_lib.build(runs, run.path, cfg.title)
    write_bytes_atomic(run.file(REPORT_FILE), text.encode())
    run.finish(inputs={f"{r}": r / report_lib.load_source(r)[0] for r in runs})
    return CompareOutcome(out, figures=figures)
