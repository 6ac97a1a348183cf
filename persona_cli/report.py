"""`persona-cli report`: Markdown and PNG figures from `stats` and `compare` runs.

For each input run (a directory holding stats.json or compare.json) the report draws a bar chart
of every condition's mean with its 95% CI half-width as an error bar and each seed's value as a
dot, and, when conditions share seeds with the reference, a pre/post plot that joins each seed's
reference value to its value under every other condition. The Markdown repeats the numbers as a
table (with the comparison columns for compare runs: each p-value with its test and alternative,
the Holm-adjusted one, the pooled count test where there is one and the notes saying which test
is the headline) and links the figures, so the report can be read without the plots and
regenerated from the JSON alone. A compare.json of an earlier schema is read through
`compare.upgrade`.

    persona-cli report runs/compare_em runs/stats_cap --out runs/report
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_json, write_bytes_atomic
from persona_cli.compare import markdown_table, upgrade
from persona_cli.errors import InputError
from persona_cli.guard import ProtocolDifference, guard_runs
from persona_cli.schemas import MANIFEST

SOURCES = ("compare.json", "stats.json")


def load_source(run: Path) -> tuple[str, dict[str, Any]]:
    for name in SOURCES:
        if (run / name).is_file():
            result = read_json(run / name)
            return name, upgrade(result, run / name) if name == "compare.json" else result
    raise InputError(run, f"holds neither {' nor '.join(SOURCES)} (not a stats/compare run)")


def guard_sources(runs: list[Path], allow_diff: set[str]) -> list[ProtocolDifference]:
    """The protocol guard across a report's inputs: the runs behind every stats/compare input,
    grouped by the command that made them (a report may hold eval-markers and judge-align
    results side by side), must agree except where an input declared a difference with
    --allow-diff, or where `allow_diff` declares one now. Raises ProtocolMismatch."""
    declared = set(allow_diff)
    by_command: dict[str, dict[str, Path]] = {}
    for source in runs:
        _, result = load_source(source)
        declared |= {d["field"] for d in result["allowed_differences"]}
        for condition in result["conditions"].values():
            for r in condition["runs"]:
                command = read_json(Path(r) / MANIFEST)["command"]
                by_command.setdefault(command, {})[r] = Path(r)
    allowed: list[ProtocolDifference] = []
    for group in by_command.values():
        allowed += guard_runs(group, declared)
    return allowed


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_") or "metric"


def _save(fig: Any, path: Path) -> None:
    # Through a buffer and an atomic rename: a killed report never leaves a half-written PNG.
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def bar_chart(result: dict[str, Any], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    names = list(result["conditions"])
    conds = [result["conditions"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.6))
    x = range(len(names))
    errs = [c["half_width"] or 0.0 for c in conds]
    ax.bar(
        x, [c["mean"] for c in conds], yerr=errs, capsize=5, color="#8fb3d9", edgecolor="#2f5f8f"
    )
    for i, c in enumerate(conds):
        ax.scatter([i] * len(c["values"]), c["values"], color="#222222", s=12, zorder=3)
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean ± 95% CI, dots = seeds")
    fig.tight_layout()
    _save(fig, path)


def paired_plot(result: dict[str, Any], metric: str, path: Path) -> bool:
    """Reference (pre) to condition (post) per seed; False when no seeds are shared."""
    ref_name = result.get("reference")
    if ref_name is None:
        return False
    ref = result["conditions"][ref_name]
    ref_by_seed = dict(zip(ref["seeds"], ref["values"], strict=True))
    others = [n for n in result["conditions"] if n != ref_name]
    pairs = {
        n: [
            (ref_by_seed[s], v)
            for s, v in zip(
                result["conditions"][n]["seeds"], result["conditions"][n]["values"], strict=True
            )
            if s in ref_by_seed
        ]
        for n in others
    }
    if not any(pairs.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(others), figsize=(3.2 * len(others), 3.4), squeeze=False)
    for ax, name in zip(axes[0], others, strict=True):
        for pre, post in pairs[name]:
            ax.plot([0, 1], [pre, post], marker="o", color="#2f5f8f", alpha=0.8)
        ax.set_xticks([0, 1], [ref_name, name])
        ax.set_title(f"{name} vs {ref_name}")
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric}: paired by seed")
    fig.tight_layout()
    _save(fig, path)
    return True


def build(runs: list[Path], out: Path, title: str) -> tuple[str, list[Path]]:
    """Write the figures into `out`; return the Markdown text and the figure paths."""
    sections = [f"# {title}\n"]
    figures: list[Path] = []
    for run in runs:
        kind, result = load_source(run)
        metric = result["metric"]
        slug = _slug(f"{run.name}_{metric}")
        bar = out / f"{slug}_bars.png"
        bar_chart(result, metric, bar)
        figures.append(bar)
        sections.append(f"## {metric} ({kind.removesuffix('.json')} run `{run}`)\n")
        sections.append(markdown_table(result, metric))
        if kind == "compare.json":
            sections.append(f"\n{result['cohens_d_convention']}.\n")
        for d in result["allowed_differences"]:
            sections.append(
                f"\n- Declared protocol difference (`--allow-diff`): "
                f"`{d['field']}`: {d['values']}\n"
            )
        sections.append(f"\n![{metric} by condition]({bar.name})\n")
        paired = out / f"{slug}_paired.png"
        if paired_plot(result, metric, paired):
            figures.append(paired)
            sections.append(f"\n![{metric} paired by seed]({paired.name})\n")
    return "\n".join(sections), figures
