"""Per-sample cosine pass: vectorised (batched hooks) vs loop vs one plain batched fwd+bwd.

One workload for all three, measured side by side in one process, alternating paths each
repeat so machine load drifts hit them alike: B samples (default 16) of SmolLM2-135M on CPU,
each a shipped coding problem's prompt rendered through the chat template plus a completion,
LoRA r=8 on all seven projections (persona_cli.probe defaults). Each path ends in the per-sample
cosines with a fixed v_hack-shaped vector:

- vectorised: `per_sample_grads(method="batched")` + `cosines` (what probe replay runs);
- loop: one unpadded forward and backward per sample (the research log's method) + `cosines`;
- batched fwd+bwd: one plain forward and backward of the summed loss (no per-sample anything):
  the floor a per-sample method is measured against.

    python benchmarks/bench_cosine.py --write       # appends/updates the section in BENCHMARKS.md
    python benchmarks/bench_cosine.py --batch 16 --repeats 5 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from machine import ROOT, cpu_name, git_commit, load_average, write_section

from persona_cli import models
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.probe.adapters import ProbeAdapter, build_adapter
from persona_cli.probe.config import AdapterConfig
from persona_cli.probe.encoding import Encoded, encode
from persona_cli.probe.geometry import cosines
from persona_cli.probe.grads import batch_gradient, per_sample_grads
from persona_cli.problems import build_prompt, load_problems

SECTION = "## Per-sample cosine"


def workload(tokenizer, batch: int, max_length: int) -> list[Encoded]:
    report = inspect_template(tokenizer)
    system = SystemPrompt.parse("none")
    problems = load_problems()
    out = []
    for i in range(batch):
        p = problems[i % len(problems)]
        msgs = [{"role": "user", "content": build_prompt(p, hint="simple_overwrite_tests")}]
        prompt = render(tokenizer, msgs, system, report, add_generation_prompt=True)
        completion = (
            f"Here is my solution.\n```python\n{p.signature}\n"
            f"    # {p.statement[: 40 + 7 * i]}\n    raise NotImplementedError\n```\n"
        )
        out.append(encode(tokenizer, prompt, completion, max_length=max_length))
    return out


def perturb(adapter: ProbeAdapter, seed: int = 0, scale: float = 0.01) -> ProbeAdapter:
    """Move the adapter off LoRA's B = 0 init (seeded), so every LoRA tensor has a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    return adapter


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=models.EMBEDDED)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=AdapterConfig().rank)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()

    resolved = models.ensure_prepared(args.model)
    tok = models.load_tokenizer(resolved)
    model = models.load_model(resolved, dtype="float32", device="cpu").eval()
    adapter = perturb(build_adapter(model, AdapterConfig(kind="lora", rank=args.rank)))
    samples = workload(tok, args.batch, args.max_length)
    v = torch.randn(adapter.size, generator=torch.Generator().manual_seed(1))
    pad = tok.pad_token_id

    def vectorised() -> None:
        cosines(per_sample_grads(adapter, samples, pad, batch_size=args.batch).grads, v, adapter)

    def loop() -> None:
        cosines(per_sample_grads(adapter, samples, pad, method="loop").grads, v, adapter)

    def plain() -> None:
        batch_gradient(adapter, samples, pad)

    paths = {"vectorised": vectorised, "loop": loop, "batched fwd+bwd": plain}
    # Warm-up (allocator, kernels, lazy init) on two samples: a full pass costs a minute here.
    warm = samples[:2]
    per_sample_grads(adapter, warm, pad, batch_size=2)
    per_sample_grads(adapter, warm, pad, method="loop")
    batch_gradient(adapter, warm, pad)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(t) for k, t in times.items()}
    tokens = [len(s.input_ids) for s in samples]
    lines = [
        f"- command: `python benchmarks/bench_cosine.py --batch {args.batch} --repeats "
        f"{args.repeats}{' --write' if args.write else ''}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load_average()} at the end",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, git {git_commit()}",
        f"- workload: {args.model}, fp32, LoRA r={args.rank} on all 7 projections "
        f"({adapter.size:,} adapter parameters, {len(adapter.modules)} modules), batch "
        f"{args.batch}, {min(tokens)}-{max(tokens)} tokens per sample "
        f"({sum(s.n_completion for s in samples)} completion tokens scored)",
        "",
        "| path | median s | all runs (s) | vs loop | vs batched fwd+bwd |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name, t in med.items():
        runs = ", ".join(f"{x:.2f}" for x in times[name])
        lines.append(
            f"| {name} | {t:.2f} | {runs} | {med['loop'] / t:.2f}x faster | "
            f"{t / med['batched fwd+bwd']:.2f}x the time |"
        )
    body = "\n".join([*lines, "", *verdict(med)])
    print(body)
    if args.write:
        note = (
            "Written by `benchmarks/bench_cosine.py`. Goal: vectorised >= 5x faster than the "
            "loop and <= 1.5x one batched forward+backward."
        )
        write_section(ROOT / "BENCHMARKS.md", "bench_cosine", f"{SECTION}\n\n{note}\n\n{body}")


def verdict(med: dict[str, float]) -> list[str]:
    speedup = med["loop"] / med["vectorised"]
    overhead = med["vectorised"] / med["batched fwd+bwd"]
    lines = [
        f"- vectorised vs loop: **{speedup:.2f}x** faster (goal >= 5x: "
        f"{'met' if speedup >= 5 else 'missed'})",
        f"- vectorised vs one batched forward+backward: **{overhead:.2f}x** the time (goal <= "
        f"1.5x: {'met' if overhead <= 1.5 else 'missed'})",
    ]
    if speedup < 5:
        lines.append(
            "- why the loop goal is missed here: the vectorised path costs what one batched "
            "forward+backward costs, so its speed-up over the loop is the speed-up of batching "
            "itself. On a 2-core CPU a batch-1 pass of 200-300 tokens already keeps both cores' "
            "matmuls busy (M = tokens, not samples), so batching 16 buys only better cache use, "
            "and the right-padded batch computes every row to the longest sample. What would "
            "close it: a GPU, where batch 1 leaves the device idle (expected to reach the goal; "
            "not measured here); on CPU, packing the samples into one padding-free sequence "
            "(the hooks' per-sample sums become per-segment sums) removes the padding work."
        )
    return lines


if __name__ == "__main__":
    main()
