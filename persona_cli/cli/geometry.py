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

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import (
    Adapters,
    Force,
    OutDir,
    PersonasFile,
    QuestionsFile,
    Seed,
    generation_config,
    say_already_done,
)
from persona_cli.generate import GenerationConfig
from persona_cli.geometry.extract import ExtractConfig, run_extract
from persona_cli.geometry.leakage import LeakageConfig, run_leakage
from persona_cli.geometry.shift import ShiftConfig, run_shift
from persona_cli.geometry.similarity import SimilarityConfig, run_similarity
from persona_cli.geometry.trait import ProjectConfig, TraitConfig, run_project, run_trait


def _help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(cls)}


_X, _XH = ExtractConfig(), _help(ExtractConfig)
_S, _SH = SimilarityConfig(), _help(SimilarityConfig)
_L, _LH = LeakageConfig(), _help(LeakageConfig)
_SH_, _SHH = ShiftConfig(), _help(ShiftConfig)
_T, _TH = TraitConfig(), _help(TraitConfig)
_P, _PH = ProjectConfig(), _help(ProjectConfig)
_G, _GH = _X.generation, GenerationConfig.help()

app = typer.Typer(
    help="Persona geometry: persona vectors per layer, cosine structure, leakage vs proximity.",
    no_args_is_help=True,
)


def _ids(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(p.strip() for p in value.split(",") if p.strip())


@app.command("extract")
def extract(
    out: OutDir,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help=_XH["model"], show_default=False)
    ] = _X.model,
    adapter: Adapters = None,
    personas: PersonasFile = None,
    persona_ids: Annotated[
        str | None, typer.Option("--persona-ids", help=_XH["persona_ids"], show_default=False)
    ] = None,
    questions: QuestionsFile = None,
    limit_questions: Annotated[
        int | None, typer.Option("--limit-questions", help=_XH["limit_questions"])
    ] = _X.limit_questions,
    layers: Annotated[str, typer.Option("--layers", help=_XH["layers"])] = _X.layers,
    method: Annotated[str, typer.Option("--method", help=_XH["method"])] = _X.method,
    samples_run: Annotated[
        Path | None, typer.Option("--samples-run", help=_XH["samples_run"], show_default=False)
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", help=_GH["n"])] = _G.n,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help=_GH["max_new_tokens"])
    ] = _G.max_new_tokens,
    temperature: Annotated[
        float, typer.Option("--temperature", help=_GH["temperature"])
    ] = _G.temperature,
    seed: Seed = _G.seed,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help=_XH["batch_size"])
    ] = _X.batch_size,
    dtype: Annotated[str, typer.Option("--dtype", help=_XH["dtype"])] = _X.dtype,
    force: Force = False,
) -> None:
    """Persona centroids per layer: prompt-last and/or response-mean hidden states.

    Writes centroids.safetensors (personas x layers x hidden per method),
    question_vectors.safetensors, rows.jsonl.gz (per persona, question and method: token
    counts and per-layer norms), summary.json, and samples.jsonl.gz when it generated answers.
    """
    generation = generation_config(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        n=samples,
        seed=seed,
        batch_size=batch_size,
    )
    cfg = ExtractConfig(
        model=model,
        adapters=None if adapter is None else tuple(str(a) for a in adapter),
        personas_file=str(personas) if personas else None,
        persona_ids=_ids(persona_ids),
        questions_file=str(questions) if questions else None,
        limit_questions=limit_questions,
        layers=layers,
        method=method,
        samples_run=str(samples_run) if samples_run else None,
        generation=generation,
        batch_size=batch_size,
        dtype=dtype,
    )
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
    current: list[Any] = []

    def stage(label: str, total: int) -> None:
        current.append(bar.add_task(label, total=total))
        bar.start()

    with bar:
        result = run_extract(
            cfg, out, force=force, stage=stage, advance=lambda n: bar.advance(current[-1], n)
        )
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
def similarity(
    run: Annotated[Path, typer.Argument(help=_SH["extract_run"], show_default=False)],
    out: OutDir,
    reference: Annotated[str, typer.Option("--reference", help=_SH["reference"])] = _S.reference,
    resamples: Annotated[int, typer.Option("--resamples", help=_SH["resamples"])] = _S.resamples,
    seed: Annotated[int, typer.Option("--seed", help=_SH["seed"])] = _S.seed,
    force: Force = False,
) -> None:
    """Cosine matrices per method and layer (raw, centred, reference-subtracted), heatmaps, and
    bootstrap intervals over questions. Prints the nearest and farthest persona pairs."""
    cfg = SimilarityConfig(
        extract_run=str(run), reference=reference, resamples=resamples, seed=seed
    )
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
def leakage(
    similarity_run: Annotated[
        Path, typer.Option("--similarity", help=_LH["similarity_run"], show_default=False)
    ],
    markers_run: Annotated[
        Path, typer.Option("--markers", help=_LH["markers_run"], show_default=False)
    ],
    out: OutDir,
    source: Annotated[
        str | None, typer.Option("--source", help=_LH["source"], show_default=False)
    ] = _L.source,
    matrix: Annotated[str, typer.Option("--matrix", help=_LH["matrix"])] = _L.matrix,
    resamples: Annotated[int, typer.Option("--resamples", help=_LH["resamples"])] = _L.resamples,
    seed: Annotated[int, typer.Option("--seed", help=_LH["seed"])] = _L.seed,
    force: Force = False,
) -> None:
    """Per bystander: cosine to the source vs marker rate; Pearson and Spearman correlation
    per method and layer, bootstrap intervals over bystanders, a scatter PNG per layer."""
    cfg = LeakageConfig(
        similarity_run=str(similarity_run),
        markers_run=str(markers_run),
        source=source,
        matrix=matrix,
        resamples=resamples,
        seed=seed,
    )
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
def shift(
    run_a: Annotated[Path, typer.Argument(help=_SHH["run_a"], show_default=False)],
    run_b: Annotated[Path, typer.Argument(help=_SHH["run_b"], show_default=False)],
    out: OutDir,
    resamples: Annotated[int, typer.Option("--resamples", help=_SHH["resamples"])] = _SH_.resamples,
    seed: Annotated[int, typer.Option("--seed", help=_SHH["seed"])] = _SH_.seed,
    force: Force = False,
) -> None:
    """Centroid shift from extract run A to B (same personas and questions; only the adapter
    stack may differ): per persona cosine and L2 of B - A, the change in mean off-diagonal
    cosine, paired bootstrap intervals over questions, a bar PNG per method."""
    cfg = ShiftConfig(run_a=str(run_a), run_b=str(run_b), resamples=resamples, seed=seed)
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
def trait(
    run: Annotated[Path, typer.Argument(help=_TH["extract_run"], show_default=False)],
    positive: Annotated[str, typer.Option("--positive", help=_TH["positive"], show_default=False)],
    negative: Annotated[str, typer.Option("--negative", help=_TH["negative"], show_default=False)],
    out: OutDir,
    method: Annotated[str, typer.Option("--method", help=_TH["method"])] = _T.method,
    filter_by: Annotated[
        Path | None, typer.Option("--filter-by", help=_TH["filter_by"], show_default=False)
    ] = None,
    trait_metric: Annotated[
        str, typer.Option("--trait-metric", help=_TH["trait_metric"])
    ] = _T.trait_metric,
    trait_threshold: Annotated[
        float, typer.Option("--trait-threshold", help=_TH["trait_threshold"])
    ] = _T.trait_threshold,
    coherence_threshold: Annotated[
        float, typer.Option("--coherence-threshold", help=_TH["coherence_threshold"])
    ] = _T.coherence_threshold,
    force: Force = False,
) -> None:
    """Trait vector v_l = centroid(positive) - centroid(negative) per layer, from an extract
    run holding both personas; writes trait.safetensors (layers x hidden). --filter-by keeps
    only the answer pairs a judge-align run passed (writes pairs.jsonl.gz)."""
    cfg = TraitConfig(
        extract_run=str(run),
        positive=positive,
        negative=negative,
        method=method,
        filter_by=str(filter_by) if filter_by else None,
        trait_metric=trait_metric,
        trait_threshold=trait_threshold,
        coherence_threshold=coherence_threshold,
    )
    result = run_trait(cfg, out, force=force)
    if result.already_done:
        say_already_done(result.run.path)
    t = Table(title=f"trait {positive} - {negative} ({method}, {result.meta.model['spec']})")
    t.add_column("layer", justify="right")
    t.add_column("|v|", justify="right")
    for layer, norm in result.norms.items():
        t.add_row(str(layer), f"{norm:.4g}")
    console.print(t)
    if result.kept_pairs is not None:
        console.print(f"judged pairs kept: {result.kept_pairs}", highlight=False)
    console.print(f"trait: {result.run.file('trait.safetensors')}", highlight=False)


@app.command("project")
def project(
    trait_run: Annotated[Path, typer.Option("--trait", help=_PH["trait_run"], show_default=False)],
    samples_run: Annotated[
        Path, typer.Option("--samples-run", help=_PH["samples_run"], show_default=False)
    ],
    out: OutDir,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help=_PH["batch_size"])
    ] = _P.batch_size,
    dtype: Annotated[str, typer.Option("--dtype", help=_PH["dtype"])] = _P.dtype,
    intervened: Annotated[
        bool, typer.Option("--intervened/--plain", help=_PH["intervened"])
    ] = _P.intervened,
    force: Force = False,
) -> None:
    """Score every completion of an eval-markers run by its projection on a trait vector
    (mean response hidden state . v / |v|, per layer); rows and a per-persona summary."""
    cfg = ProjectConfig(
        trait_run=str(trait_run),
        samples_run=str(samples_run),
        batch_size=batch_size,
        dtype=dtype,
        intervened=intervened,
    )
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
