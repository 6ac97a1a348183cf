"""`persona-cli eval-markers`: marker rate per persona, with intervals, a heatmap and every sample.

    persona-cli eval-markers --out runs/eval_base --model smollm2-135m --source villain
    persona-cli eval-markers --out runs/eval_couple --adapter runs/couple --source villain \
        --personas-ids villain,assistant,paramedic --samples 10 --backend vllm
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.eval import adapter_sets
from persona_cli.eval.config import MarkerEvalConfig

if TYPE_CHECKING:
    from persona_cli.eval.outputs import EvalResult


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


def _sets_table(results: list[EvalResult]) -> Table:
    t = Table(title=f"adapter sets ({len(results)} run directories)")
    for col in ("set", "adapters", "source rate", "mean bystander", "run"):
        t.add_column(col, justify="right" if "rate" in col or "mean" in col else "left")
    for r in results:
        s = r.summary
        src = f"{s['source']['rate']:.1%}" if s["source"] else "-"
        by = f"{s['bystanders']['mean_rate']:.1%}" if s["bystanders"] else "-"
        state = " (already done)" if r.already_done else ""
        t.add_row(r.run.path.name, str(len(s["adapters"])), src, by, f"{r.run.path}{state}")
    return t


@configured(
    MarkerEvalConfig,
    flags={
        "persona_ids": "--personas-ids",
        "case_sensitive": "--case-sensitive/--ignore-case",
        "generation.n": "--samples -k",
        "adapter_sets": "--adapter-set",
        "adapter_sets_file": "--adapter-sets",
        "steering.positions": "--steer-positions",
        "vllm.dtype": "--vllm-dtype",
        "vllm.max_model_len": "--vllm-max-model-len",
        "vllm.enforce_eager": "--vllm-enforce-eager/--vllm-cuda-graphs",
    },
    repeat={"adapter_sets", "steering.steer", "steering.ablate"},
    parsers={"adapter_sets": lambda texts: tuple(adapter_sets.parse_option(t) for t in texts)},
    report_to=True,
)
def eval_markers(cfg: MarkerEvalConfig, out: Path, force: bool) -> None:
    """Marker rate per persona: P personas x Q questions x K samples, substring match.

    Writes samples.jsonl.gz (every completion), summary.json (rate and Wilson 95% interval per
    persona, source and mean bystander rate), heatmap.png, manifest.json and DONE. An
    interrupted run resumes where it stopped. With --adapter-set/--adapter-sets, one such run
    directory per set under --out, the base model loaded (or the vLLM engine started) once.
    """
    from persona_cli.eval.markers import run_eval_markers, run_eval_markers_sets

    if cfg.adapter_sets or cfg.adapter_sets_file:
        with ProgressDisplay("eval-markers") as display:
            results = run_eval_markers_sets(cfg, out, force=force, progress=display)
        console.print(_sets_table(results))
        return

    with ProgressDisplay("eval-markers") as display:
        result = run_eval_markers(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
    console.print(_table(result))
    console.print(f"samples: {result.run.file('samples.jsonl.gz')}", highlight=False)
    console.print(f"summary: {result.run.file('summary.json')}", highlight=False)
    console.print(f"heatmap: {result.heatmap}", highlight=False)
