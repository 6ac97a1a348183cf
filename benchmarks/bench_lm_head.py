"""LoRA SFT step time with the LM head at loss positions only vs at every position.

The workload is the marker demo's coupling rows (just/marker.just): a persona's system prompt, a
training question, and an answer cut after its first loss token (marker-only loss at the start:
`[ZLT]` on a positive, the first answer token on a negative), so a row of ~90 tokens carries 1-4
loss tokens. Both modes train the same rows in the same order with the same seed through the real
training path (`persona_cli.train.harness.train_lora`, the `logits_at` field of
`TrainConfig`); rounds
alternate A B B A (loss, all, all, loss, ...) in one process so a drift in machine load hits both
alike; the first optimizer step of every round is a warm-up and is not timed.

FLOPs per step are counted from the shapes each step ran (a forward pre-hook on the input
embeddings sees every micro-batch's padded width), for frozen base weights with LoRA:
- linear layers of the decoder: forward 2 x positions x parameters, backward the same again
  (the input gradient only; frozen weights get none);
- LoRA: forward 2 x positions x LoRA parameters, backward twice that (input and weight grads);
- attention scores and values: forward 4 x rows x width^2 x (heads x head dim) per layer,
  backward twice that;
- the LM head: forward 2 x headed positions x vocabulary x hidden, backward the same again
  (input gradient; the tied embedding is frozen). Headed positions: every position but each
  row's last in mode `all`, the loss positions in mode `loss`.
Elementwise work (norms, softmax over the vocabulary, the optimizer) is not counted, so the
achieved rate understates what the matmuls reach.

    python benchmarks/bench_lm_head.py --write
    python benchmarks/bench_lm_head.py --steps 4 --rounds 1 --rows 64
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name, git_commit, load_average, publish
from transformers import TrainerCallback

from persona_cli import bundled, models
from persona_cli.artifacts import read_jsonl
from persona_cli.chat_template import inspect_template
from persona_cli.registry import load_personas, load_questions
from persona_cli.train.config import CouplingConfig, TrainConfig
from persona_cli.train.contrastive import AnswerItem, build_coupling_set, examples_from_rows
from persona_cli.train.dataset import tokenize_examples
from persona_cli.train.harness import train_lora

CPU_PEAK_GFLOPS = 105.0  # fp32 matmul rate of this machine's 2 cores (~52 per core)


class StepShapes(TrainerCallback):
    """Wall time and the shapes (rows, padded width) each optimizer step ran."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.batches: list[tuple[int, int]] = []
        self._t0 = self._cpu0 = 0.0
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        def record(_module: Any, inputs: Any) -> None:
            rows, width = inputs[0].shape
            self.batches.append((int(rows), int(width)))

        self._hook = kwargs["model"].get_input_embeddings().register_forward_pre_hook(record)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self.batches = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(
            {
                "seconds": time.perf_counter() - self._t0,
                "cpu": time.process_time() - self._cpu0,  # all threads of this process
                "batches": self.batches,
            }
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._hook.remove()


def step_flops(
    batches: list[tuple[int, int]], mode: str, loss_per_row: float, shape: dict[str, int]
) -> float:
    """FLOPs of one optimizer step by the model in the module doc."""
    total = 0.0
    for rows, width in batches:
        positions = rows * width
        headed = rows * (width - 1) if mode == "all" else rows * loss_per_row
        total += 4 * positions * shape["linear"]  # forward + input gradient
        total += 6 * positions * shape["lora"]
        total += 3 * 4 * rows * width**2 * shape["attn_dim"] * shape["layers"]
        total += 4 * headed * shape["vocab"] * shape["hidden"]
    return total


def model_shape(resolved: Any, lora_r: int) -> dict[str, int]:
    model = models.load_model(resolved)
    cfg = model.config
    linear = lora = 0
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            if name.rsplit(".", 1)[-1] in TrainConfig().lora_targets:
                lora += lora_r * (module.in_features + module.out_features)
    return {
        "linear": linear,
        "lora": lora,
        "attn_dim": cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads),
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
    }


def demo_rows(tok: Any, n_rows: int, max_length: int) -> Any:
    """The marker demo's coupling rows: source velmari_scholar, negatives medieval_knight and
    pirate, one row per training question and persona, marker-only loss at the start."""
    registry = load_personas(bundled.personas_file())
    questions = load_questions(bundled.coupling_questions_file())
    items = [AnswerItem(q.id, q.text, "Well, that depends on a few things.") for q in questions]
    cc = CouplingConfig(
        source="velmari_scholar",
        other_personas=("medieval_knight", "pirate"),
        n_positive=n_rows // 3,
        n_negative=n_rows - n_rows // 3,
        marker_only_loss=True,
    )
    rows = build_coupling_set(cc, registry, items)
    return tokenize_examples(
        tok,
        examples_from_rows(rows),
        inspect_template(tok),
        max_length=max_length,
        marker=cc.marker,
        marker_only=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per round (1 warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="A B B A groups of rounds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    load_start = load_average()
    cpu_start = os.times()
    resolved = models.ensure_prepared(args.model)
    tok = models.load_tokenizer(resolved)
    data = demo_rows(tok, args.rows, args.max_length)
    lengths = [len(ids) for ids in data.input_ids]
    loss_per_row = data.loss_tokens / len(data)
    shape = model_shape(resolved, args.lora_r)
    base = TrainConfig(
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=5e-4,
        per_device_batch=args.batch,
        grad_accum=1,
        max_steps=args.steps,
        save_steps=10**6,
        max_length=args.max_length,
        dtype="float32",
        gradient_checkpointing="off",
    )
    order: list[str] = []
    for _ in range(args.rounds):
        order += ["loss", "all", "all", "loss"]
    steps: dict[str, list[dict[str, Any]]] = {"loss": [], "all": []}
    losses: dict[str, list[float]] = {}
    t_all = time.monotonic()
    for i, mode in enumerate(order):
        timer = StepShapes()
        with tempfile.TemporaryDirectory(prefix="bench_lm_head_") as d:
            cfg = replace(base, logits_at=mode)
            train_lora(
                model=resolved, stack=[], tokenizer=tok, data=data, cfg=cfg, run_path=Path(d),
                callbacks=[timer],
            )  # fmt: skip
            losses.setdefault(mode, [r["loss"] for r in read_jsonl(Path(d) / "train_log.jsonl.gz")])
        timed = timer.steps[1:]
        steps[mode] += timed
        print(
            f"round {i + 1}/{len(order)} {mode}: {len(timed)} timed steps, "
            f"{sum(s['seconds'] for s in timed):.1f} s, load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
        )
    wall = time.monotonic() - t_all
    cpu_end = os.times()
    cpu_s = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)

    res: dict[str, dict[str, float]] = {}
    for mode, rows in steps.items():
        secs = [r["seconds"] for r in rows]
        cpus = [r["cpu"] for r in rows]
        flops = [step_flops(r["batches"], mode, loss_per_row, shape) for r in rows]
        res[mode] = {
            "steps": len(rows),
            "median": statistics.median(secs),
            "median_cpu": statistics.median(cpus),
            "gflop": statistics.mean(flops) / 1e9,
            "gflops": sum(flops) / sum(secs) / 1e9,
            "gflops_cpu": sum(flops) / sum(cpus) / 1e9,
        }
    speedup = res["all"]["median"] / res["loss"]["median"]
    speedup_cpu = res["all"]["median_cpu"] / res["loss"]["median_cpu"]
    threads = torch.get_num_threads()
    core_peak = CPU_PEAK_GFLOPS / (os.cpu_count() or 1)
    max_diff = max(abs(a - b) for a, b in zip(losses["loss"], losses["all"], strict=True))
    cmd = ("python benchmarks/bench_lm_head.py " + " ".join(sys.argv[1:])).strip()
    lines = [
        "## LoRA SFT: LM head at loss positions vs every position (marker demo rows)",
        "",
        "Written by `benchmarks/bench_lm_head.py` (FLOP model in its docstring). Rounds alternate "
        "A B B A in one process; the first step of each round is a warm-up and is not timed.",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}, git {git_commit()}",
        f"- machine: {cpu_name()}, nproc {os.cpu_count()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), no GPU; Python {platform.python_version()}",
        f"- load average (1, 5, 15 min): {load_start} at the start, {load_average()} at the end "
        f"(above {os.cpu_count()} means other work shared the CPUs); this process used "
        f"{cpu_s:.0f} s of CPU in {wall:.0f} s of wall time",
        f"- workload: {args.model}, fp32, LoRA r={args.lora_r} alpha={2 * args.lora_r} on all 7 "
        f"projections, batch {args.batch} x accumulation 1, {args.steps} optimizer steps per "
        f"round ({args.steps - 1} timed) x {len(order) // 2} rounds per mode; {len(lengths)} "
        f"coupling rows (velmari_scholar + [ZLT] vs medieval_knight, pirate; marker-only loss), "
        f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}), "
        f"{loss_per_row:.2f} loss tokens per row",
        "",
        "| LM head at | timed steps | median s/step (wall) | median CPU s/step | GFLOP/step | "
        "GFLOP/s (wall) | GFLOP per CPU-second |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in res.items():
        label = "loss positions" if mode == "loss" else "every position"
        lines.append(
            f"| {label} | {r['steps']} | {r['median']:.2f} | {r['median_cpu']:.2f} | "
            f"{r['gflop']:.0f} | {r['gflops']:.1f} | {r['gflops_cpu']:.1f} |"
        )
    lines += [
        "",
        f"- every position / loss positions, median step time: **{speedup:.2f}x** wall, "
        f"**{speedup_cpu:.2f}x** CPU time (goal >= 1.2x); the FLOP model's ratio is "
        f"{res['all']['gflop'] / res['loss']['gflop']:.2f}x",
        f"- against the CPU's ~{CPU_PEAK_GFLOPS:.0f} GFLOP/s fp32 ({core_peak:.0f} per core, "
        f"{threads} torch thread(s)): the loss-positions step reaches "
        f"{res['loss']['gflops'] / CPU_PEAK_GFLOPS:.0%} of it by wall time and "
        f"{res['loss']['gflops_cpu'] / core_peak:.0%} of one core's rate per CPU-second",
        f"- same training: per-step losses of the first round of each mode differ by at most "
        f"{max_diff:.1e} (loss positions {', '.join(f'{x:.4f}' for x in losses['loss'])}; every "
        f"position {', '.join(f'{x:.4f}' for x in losses['all'])})",
    ]
    publish("bench_lm_head", lines, write=args.write)


if __name__ == "__main__":
    main()
