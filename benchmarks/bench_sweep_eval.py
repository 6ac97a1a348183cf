"""A dose sweep's evaluation stage: one model / engine per cell vs one for all cells.

The dose-demo's evaluation stage on SmolLM2-135M: cells = the coupling adapter alone (dose 0)
plus `--doses` second-stage adapters stacked on it (the demo: 3 doses x 2 arms = 6, so 7 cells),
each cell evaluating the source persona on `--questions` held-out questions x `--samples`
samples, `--max-new-tokens` new tokens (the demo's eval args). The adapters are constructed, not
trained (LoRA r=16 on all 7 projections, small random B; a cell's cost does not depend on what
its weights say): training them would cost 8 s a step here and measure nothing of interest.

Four arms, one after another in one process, on the same cells:
- hf, one run per cell: `run_eval_markers` per cell (each loads the model and merges its stack),
  what `dose-sweep run` did before adapter sets;
- hf, one adapter set: `run_eval_markers_sets` over all cells (the base loaded once, each stack
  merged in and the base restored);
- vllm, one adapter set: one engine, every cell its own LoRARequest;
- vllm, one engine per cell: `run_eval_markers --backend vllm` per cell.
Every arm writes real run directories (under a scratch folder), so the figures include what a
sweep pays: template rendering, shards, summaries, heatmaps, manifests. The hf arms must write
identical samples (checked and reported).

    python benchmarks/bench_sweep_eval.py --write      # updates BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import yaml
from machine import cpu_name, git_commit, load_average, publish

from persona_cli import bundled, models
from persona_cli.adapters import read_adapter, write_record
from persona_cli.eval.adapter_sets import AdapterSet
from persona_cli.eval.markers import MarkerEvalConfig, run_eval_markers, run_eval_markers_sets
from persona_cli.generate import GenerationConfig, VllmConfig
from persona_cli.generate.vllm import engine_env
from persona_cli.registry import load_questions

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(resolved, path: Path, seed: int, parents: list) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft.save_pretrained(path)
    write_record(path, resolved, parents)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--doses", type=int, default=6, help="second-stage cells (plus dose 0)")
    ap.add_argument("--questions", type=int, default=52)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--source", default="velmari_scholar")
    ap.add_argument("--arms", default="hf-cell,hf-set,vllm-set,vllm-cell")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="bench_sweep_eval-"))
    resolved = models.ensure_prepared(args.model)
    coupling = scratch / "adapters" / "coupling"
    make_adapter(resolved, coupling, 0, [])
    doses = []
    for i in range(args.doses):
        make_adapter(resolved, scratch / "adapters" / f"dose{i}", i + 1, [read_adapter(coupling)])
        doses.append(scratch / "adapters" / f"dose{i}")
    stacks = {"d0": [coupling]} | {f"d{i + 1}": [coupling, d] for i, d in enumerate(doses)}
    questions = scratch / "questions.yaml"
    qs = load_questions(bundled.eval_questions_file())[: args.questions]
    questions.write_text(yaml.safe_dump([{"id": q.id, "paraphrases": [q.text]} for q in qs]))
    base = MarkerEvalConfig(
        model=args.model,
        persona_ids=(args.source,),
        questions_file=str(questions),
        source=args.source,
        generation=GenerationConfig(n=args.samples, max_new_tokens=args.max_new_tokens, seed=42),
        vllm=VllmConfig(),
    )
    per_cell = len(qs) * args.samples
    results: dict[str, dict] = {}
    for arm in args.arms.split(","):
        backend, mode = arm.split("-")
        cfg = replace(base, backend=backend)
        out = scratch / arm
        load0 = load_average()
        t0 = time.monotonic()
        if mode == "cell":
            for name, stack in stacks.items():
                run_eval_markers(replace(cfg, adapters=tuple(map(str, stack))), out / name)
        else:
            sets = tuple(AdapterSet(n, tuple(map(str, s))) for n, s in stacks.items())
            run_eval_markers_sets(replace(cfg, adapter_sets=sets), out)
        seconds = time.monotonic() - t0
        results[arm] = {"seconds": seconds, "load": (load0, load_average())}
        print(f"{arm}: {seconds:.1f} s (load {load0} -> {load_average()})", file=sys.stderr)

    same = None
    if {"hf-cell", "hf-set"} <= set(results):
        same = all(
            (scratch / "hf-cell" / n / "samples.jsonl.gz").read_bytes()
            == (scratch / "hf-set" / n / "samples.jsonl.gz").read_bytes()
            for n in stacks
        )
    n_all = per_cell * len(stacks)
    cmd = "python benchmarks/bench_sweep_eval.py " + " ".join(sys.argv[1:])
    env = ", ".join(f"{k}={v}" for k, v in engine_env(VllmConfig()).items())
    lines = [
        "## A dose sweep's evaluation stage: one model / engine per cell vs one for all cells",
        "",
        "Written by `benchmarks/bench_sweep_eval.py`. Goal: one vLLM engine for all cells >= 2x "
        "faster than one engine per cell.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}, git {git_commit()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU threads, no GPU; Python "
        f"{platform.python_version()}, float32; vLLM worker env: {env}",
        f"- workload: {args.model}, {len(stacks)} cells (dose 0: the coupling adapter alone; "
        f"{args.doses} cells: coupling + a second-stage adapter, LoRA r=16 on all 7 "
        f"projections), each {args.questions} questions x {args.samples} samples of persona "
        f"{args.source} = {per_cell} completions, max {args.max_new_tokens} new tokens "
        f"(the dose-demo's evaluation); {n_all} completions per arm; total wall time "
        f"{time.monotonic() - started:.0f} s",
        "",
        "| arm | wall s | completions/s | load average at start -> end |",
        "| --- | ---: | ---: | --- |",
    ]
    for arm, r in results.items():
        lines.append(
            f"| {arm} | {r['seconds']:.1f} | {n_all / r['seconds']:.2f} | "
            f"{r['load'][0]} -> {r['load'][1]} |"
        )
    lines.append("")
    for backend in ("hf", "vllm"):
        cell, one = results.get(f"{backend}-cell"), results.get(f"{backend}-set")
        if cell and one:
            ratio = cell["seconds"] / one["seconds"]
            goal = " (goal >= 2x)" if backend == "vllm" else ""
            lines.append(f"- {backend}: one for all cells / one per cell: **{ratio:.2f}x**{goal}")
    if same is not None:
        lines.append(f"- hf arms wrote identical samples in every cell: {same}")
    publish("bench_sweep_eval", lines, write=args.write)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
