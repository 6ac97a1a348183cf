"""`persona-cli persona-vectors`: persona centroids, cosine structure, leakage, shift, traits.

    persona-cli persona-vectors extract --out runs/pv --model smollm2-135m --layers 10,20,all
    persona-cli persona-vectors similarity runs/pv --out runs/pv_sim
    persona-cli persona-vectors leakage --similarity runs/pv_sim --markers runs/eval --out runs/leak
    persona-cli persona-vectors shift runs/pv runs/pv_em --out runs/pv_shift
    persona-cli persona-vectors trait runs/pv --positive villain --negative assistant --out runs/t
    persona-cli persona-vectors project --trait runs/t --samples-run runs/eval --out runs/proj
    persona-cli eval-markers --out runs/steered --steer runs/t:15:2.0    # steering at generation

Each command parses its options into the library's frozen config (whose fields carry the help
text and defaults), calls one function of `persona_cli.geometry`, and prints its result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.geometry.config import (
    ExtractConfig,
    LeakageConfig,
    ProjectConfig,
    ShiftConfig,
    SimilarityConfig,
    TraitConfig,
)

app = typer.Typer(
    help="Persona geometry: persona vectors per layer, cosine structure, leakage vs proximity.",
    no_args_is_help=True,
)


@app.command("extract")
@configured(
    ExtractConfig,
    flags={"generation.n": "--samples -k"},
    links={"generation.batch_size": "batch_size"},
    report_to=True,
)
def extract(cfg: ExtractConfig, out: Path, force: bool) -> None:
    """Persona centroids per layer: prompt-last and/or response-mean hidden states.

    Writes centroids.safetensors (personas x layers x hidden per method),
    question_vectors.safetensors, rows.jsonl.gz (per persona, question and method: token
    counts and per-layer norms), summary.json, and samples.jsonl.gz when it generated answers.
    """
    from persona_cli.geometry.extract import run_extract

    with ProgressDisplay("persona-vectors extract") as display:
        result = run_extract(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
    s = result.summary
    t = Table(title=f"persona vectors of {s['model']['spec']} ({s['hidden_size']} wide)")
    for col in ("method", "personas", "questions", "layers", "sequences", "tokens"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m in s["methods"]:
        c = s["counts"][m]
        layers_text = ",".join(map(str, s["layers"]))
        t.add_row(
            m, str(len(s["personas"])), str(len(s["questions"])), layers_text,
            str(c["sequences"]), str(c["tokens"]),
        )  # fmt: skip
    console.print(t)
    console.print(f"centroids: {result.run.file('centroids.safetensors')}", highlight=False)


@app.command("similarity")
@configured(SimilarityConfig, arguments={"extract_run"})
def similarity(cfg: SimilarityConfig, out: Path, force: bool) -> None:
    """Cosine matrices per method and layer (raw, centred, reference-subtracted), heatmaps, and
    bootstrap intervals over questions. Prints the nearest and farthest persona pairs."""
    from persona_cli.geometry.similarity import run_similarity

    result = run_similarity(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    doc = result.doc
    t = Table(title=f"persona cosines ({doc['model']['spec']}, reference {doc['reference']})")
    for col in (
        "method",
        "layer",
        "mean off-diag raw [95%]",
        "mean off-diag centred [95%]",
        "nearest (centred)",
        "farthest (centred)",
    ):
        t.add_column(col, justify="right" if col == "layer" else "left")  # fmt: skip
    for method, layers in doc["results"].items():
        for d in layers:
            pairs = d["pairs"]["centred"]
            t.add_row(
                method, str(d["layer"]), _ci(d["mean_offdiag"]["raw"]),
                _ci(d["mean_offdiag"]["centred"]), _pair(pairs["nearest"]),
                _pair(pairs["farthest"]),
            )  # fmt: skip
    console.print(t)
    console.print(f"similarity: {result.run.file('similarity.json')}", highlight=False)
    console.print(f"heatmaps: {len(result.heatmaps)} PNG(s) in {result.run.path}", highlight=False)


def _ci(x: dict[str, float | None]) -> str:
    if x["estimate"] is None:
        return "-"
    return f"{x['estimate']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def _pair(p: list[Any] | None) -> str:
    return "-" if p is None else f"{p[0]} / {p[1]} ({p[2]:.3f})"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


@app.command("leakage")
@configured(LeakageConfig, flags={"similarity_run": "--similarity", "markers_run": "--markers"})
def leakage(cfg: LeakageConfig, out: Path, force: bool) -> None:
    """Per bystander: cosine to the source vs marker rate; Pearson and Spearman correlation
    per method and layer, bootstrap intervals over bystanders, a scatter PNG per layer."""
    from persona_cli.geometry.leakage import run_leakage

    result = run_leakage(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    doc = result.doc
    t = Table(
        title=f"marker {doc['marker']!r} rate vs {doc['matrix']} cosine to {doc['source']} "
        f"({len(doc['bystanders'])} bystanders)"
    )
    for col in ("method", "layer", "Pearson r", "p", "r 95%", "Spearman rho", "p", "rho 95%"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for method, layers in doc["results"].items():
        for d in layers:
            b = d["bootstrap"]
            t.add_row(
                method, str(d["layer"]), _num(d["pearson_r"]), _num(d["pearson_p"], ".2g"),
                f"[{_num(b['pearson_r']['low'])}, {_num(b['pearson_r']['high'])}]",
                _num(d["spearman_rho"]), _num(d["spearman_p"], ".2g"),
                f"[{_num(b['spearman_rho']['low'])}, {_num(b['spearman_rho']['high'])}]",
            )  # fmt: skip
    console.print(t)
    console.print(f"leakage: {result.run.file('leakage.json')}", highlight=False)


@app.command("shift")
@configured(ShiftConfig, arguments={"run_a", "run_b"})
def shift(cfg: ShiftConfig, out: Path, force: bool) -> None:
    """Centroid shift from extract run A to B (same personas and questions; only the adapter
    stack may differ): per persona cosine and L2 of B - A, the change in mean off-diagonal
    cosine, paired bootstrap intervals over questions, a bar PNG per method."""
    from persona_cli.geometry.shift import run_shift

    result = run_shift(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    doc = result.doc
    t = Table(title=f"persona shift A -> B ({doc['model']['spec']})")
    for col in ("method", "layer", "off-diag A", "off-diag B", "change [95%]",
                "largest shift (L2)", "lowest cosine A.B"):  # fmt: skip
        t.add_column(col, justify="left" if col == "method" else "right")
    for method, layers in doc["results"].items():
        for d in layers:
            off, per = d["mean_offdiag_raw"], d["personas"]
            far = max(per, key=lambda p: per[p]["l2"]["estimate"])
            cos = {p: v["cosine"]["estimate"] for p, v in per.items() if v["cosine"]["estimate"]}
            low = min(cos, key=cos.__getitem__) if cos else None
            t.add_row(
                method, str(d["layer"]), _num(off["a"]["estimate"]), _num(off["b"]["estimate"]),
                _ci(off["delta"]), f"{far} ({per[far]['l2']['estimate']:.3g})",
                "-" if low is None else f"{low} ({cos[low]:.3f})",
            )  # fmt: skip
    console.print(t)
    declared = [d["field"] for d in doc["declared_differences"]]
    if declared:
        console.print(
            f"adapter stacks differ ({len(declared)} field(s): {', '.join(declared[:4])}"
            f"{', ...' if len(declared) > 4 else ''}); see declared_differences",
            highlight=False,
        )
    console.print(f"shift: {result.run.file('shift.json')}", highlight=False)


@app.command("trait")
@configured(TraitConfig, arguments={"extract_run"})
def trait(cfg: TraitConfig, out: Path, force: bool) -> None:
    """Trait vector v_l = centroid(positive) - centroid(negative) per layer, from an extract
    run holding both personas; writes trait.safetensors (layers x hidden). --filter-by keeps
    only the answer pairs a judge-align run passed (writes pairs.jsonl.gz)."""
    from persona_cli.geometry.trait import run_trait

    result = run_trait(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    t = Table(
        title=f"trait {cfg.positive} - {cfg.negative} ({cfg.method}, {result.meta.model['spec']})"
    )
    t.add_column("layer", justify="right")
    t.add_column("|v|", justify="right")
    for layer, norm in result.norms.items():
        t.add_row(str(layer), f"{norm:.4g}")
    console.print(t)
    if result.kept_pairs is not None:
        console.print(f"judged pairs kept: {result.kept_pairs}", highlight=False)
    console.print(f"trait: {result.run.file('trait.safetensors')}", highlight=False)


@app.command("project")
@configured(
    ProjectConfig,
    flags={"trait_run": "--trait", "intervened": "--intervened/--plain"},
)
def project(cfg: ProjectConfig, out: Path, force: bool) -> None:
    """Score every completion of an eval-markers run by its projection on a trait vector
    (mean response hidden state . v / |v|, per layer); rows and a per-persona summary."""
    from persona_cli.geometry.trait import run_project

    result = run_project(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    s = result.summary
    tr = s["trait"]
    t = Table(title=f"projection on {tr['positive']} - {tr['negative']} ({tr['method']}), "
              f"{s['n_scored']} completions, {s['n_empty']} empty")  # fmt: skip
    t.add_column("persona")
    t.add_column("n", justify="right")
    for layer in s["layers"]:
        t.add_column(f"layer {layer}", justify="right")
    for pid, d in s["personas"].items():
        t.add_row(pid, str(d["n"]), *(f"{d['mean_projection'][str(la)]:.3f}" for la in s["layers"]))
    console.print(t)
    console.print(f"projections: {result.run.file('projections.jsonl.gz')}", highlight=False)
