"""`persona-cli eval-markers`: marker rate per persona, with intervals, a heatmap and every sample.

    persona-cli eval-markers --out runs/eval_base --model smollm2-135m --source villain
    persona-cli eval-markers --out runs/eval_couple --adapter runs/couple --source villain \
        --personas-ids villain,assistant,paramedic --samples 10 --backend vllm
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Annotated

import typer
from rich.table import Table

from persona_cli.cli.console import CompletionBar, console
from persona_cli.cli.options import (
    Adapters,
    Force,
    ModelSpec,
    OutDir,
    PersonasFile,
    QuestionsFile,
    Seed,
    generation_config,
    report_done,
)
from persona_cli.eval.markers import (
    BACKENDS,
    DEFAULT_MARKER,
    DEFAULT_SAMPLES,
    EvalResult,
    MarkerEvalConfig,
    run_eval_markers,
)
from persona_cli.generate import GenerationConfig, VllmConfig
from persona_cli.geometry.steer import SteeringConfig
from persona_cli.models import EMBEDDED

_GEN = GenerationConfig()
_VLLM = VllmConfig()
_HELP = GenerationConfig.help()
_STEER = SteeringConfig()
_STEER_HELP = {f.name: f.metadata["help"] for f in fields(SteeringConfig)}


def _table(result: EvalResult) -> Table:
    s = result.summary
    t = Table(title=f"marker {s['marker']!r} ({s['backend']}, {s['n_completions']} completions)")
    for col in ("persona", "role", "hits / n", "rate", "95% CI (Wilson)"):
        t.add_column(col, justify="left" if col in ("persona", "role") else "right")
    source = s["source"]["persona"] if s["source"] else None
    negatives = (s.get("negatives") or {}).get("personas") or []
    for p in s["personas"]:
        r = s["rates"][p]
        role = (
            "source"
            if p == source
            else "negative"
            if p in negatives
            else ("bystander" if source else "")
        )
        t.add_row(
            p,
            role,
            f"{r['successes']} / {r['n']}",
            f"{r['rate']:.1%}",
            f"[{r['low']:.1%}, {r['high']:.1%}]",
        )
    if s["bystanders"]:
        t.caption = (
            f"source {source}: {s['source']['rate']:.1%}; mean bystander rate "
            f"{s['bystanders']['mean_rate']:.1%} over {len(s['bystanders']['personas'])} persona(s)"
        )
        if negatives:
            t.caption += (
                f"; mean rate of the coupling's negatives {s['negatives']['mean_rate']:.1%} "
                f"over {len(negatives)}"
            )
    return t


def eval_markers(
    out: OutDir,
    model: ModelSpec = EMBEDDED,
    adapter: Adapters = None,
    personas: PersonasFile = None,
    personas_ids: Annotated[
        str | None,
        typer.Option(
            "--personas-ids", help="Comma-separated persona ids (default: all).", show_default=False
        ),
    ] = None,
    questions: QuestionsFile = None,
    samples: Annotated[
        int, typer.Option("--samples", "-k", help="Samples per persona and question (K).")
    ] = DEFAULT_SAMPLES,
    temperature: Annotated[
        float, typer.Option("--temperature", help=_HELP["temperature"])
    ] = _GEN.temperature,
    top_p: Annotated[float, typer.Option("--top-p", help=_HELP["top_p"])] = _GEN.top_p,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help=_HELP["max_new_tokens"])
    ] = _GEN.max_new_tokens,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help=_HELP["batch_size"])
    ] = _GEN.batch_size,
    seed: Seed = _GEN.seed,
    marker: Annotated[str, typer.Option("--marker", help="Marker substring.")] = DEFAULT_MARKER,
    case_sensitive: Annotated[
        bool,
        typer.Option("--case-sensitive/--ignore-case", help="Match the marker's case or not."),
    ] = True,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Persona the marker was coupled to; the rest are bystanders.",
            show_default=False,
        ),
    ] = None,
    negatives: Annotated[
        str | None,
        typer.Option(
            "--negatives",
            help="Comma-separated personas the coupling trained without the marker, reported "
            "apart from the bystanders (default: read from the adapters' couple-marker runs).",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help=f"Generation backend: {' or '.join(BACKENDS)}.")
    ] = "hf",
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", help="vllm: GPUs to shard the model over.")
    ] = _VLLM.tensor_parallel_size,
    gpu_memory_utilization: Annotated[
        float, typer.Option("--gpu-memory-utilization", help="vllm: GPU memory fraction.")
    ] = _VLLM.gpu_memory_utilization,
    cpu_kvcache_gib: Annotated[
        int, typer.Option("--cpu-kvcache-gib", help="vllm on CPU: KV cache GiB.")
    ] = _VLLM.cpu_kvcache_gib,
    steer: Annotated[
        list[str] | None,
        typer.Option("--steer", help=_STEER_HELP["steer"], show_default=False),
    ] = None,
    steer_positions: Annotated[
        str, typer.Option("--steer-positions", help=_STEER_HELP["positions"])
    ] = _STEER.positions,
    ablate: Annotated[
        list[str] | None,
        typer.Option("--ablate", help=_STEER_HELP["ablate"], show_default=False),
    ] = None,
    force: Force = False,
) -> None:
    """Marker rate per persona: P personas x Q questions x K samples, substring match.

    Writes samples.jsonl.gz (every completion), summary.json (rate and Wilson 95% interval per
    persona, source and mean bystander rate), heatmap.png, manifest.json and DONE. An
    interrupted run resumes where it stopped.
    """
    generation = generation_config(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n=samples,
        seed=seed,
        batch_size=batch_size,
    )
    cfg = MarkerEvalConfig(
        model=model,
        adapters=tuple(str(a) for a in adapter or ()),
        personas_file=str(personas) if personas else None,
        persona_ids=(
            tuple(p.strip() for p in personas_ids.split(",") if p.strip())
            if personas_ids is not None
            else None
        ),
        questions_file=str(questions) if questions else None,
        marker=marker,
        case_sensitive=case_sensitive,
        source=source,
        negatives=(
            tuple(p.strip() for p in negatives.split(",") if p.strip())
            if negatives is not None
            else None
        ),
        backend=backend,
        generation=generation,
        vllm=replace(
            _VLLM,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            cpu_kvcache_gib=cpu_kvcache_gib,
        ),
        steering=SteeringConfig(
            steer=tuple(steer or ()), positions=steer_positions, ablate=tuple(ablate or ())
        ),
    )
    with CompletionBar(["generating"], "eval-markers") as bar:
        result = run_eval_markers(
            cfg,
            out,
            force=force,
            on_plan=bar.plan,
            progress=lambda n: bar.advance("generating", n),
        )
    if result.already_done:
        report_done(result.run)
    console.print(_table(result))
    console.print(f"samples: {result.run.file('samples.jsonl.gz')}", highlight=False)
    console.print(f"summary: {result.run.file('summary.json')}", highlight=False)
    console.print(f"heatmap: {result.heatmap}", highlight=False)
