"""eval-markers generation throughput: hf batched vs hf one prompt at a time vs vLLM.

The same workload for all three (SmolLM2-135M, P personas x Q questions x K samples, the
eval-markers prompts rendered through the chat-template guard), run one after the other in one
process, so the ratios compare like with like on the same machine at the same moment. hf
one-at-a-time (batch size 1) is measured on the first `--single-rows` completions of the
workload only, because it is the slow baseline; completions/s is a rate, so the subset is fair
as long as it is long enough. vLLM is reported with and without its engine start.

    python benchmarks/bench_eval.py --write        # updates the eval section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone

from machine import cpu_name, git_commit, publish

from persona_cli import bundled, models
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.generate import GenerationConfig, generate_hf, generate_vllm
from persona_cli.registry import load_personas, load_questions


def _prompts(tok, personas: int, questions: int) -> list[str]:
    report = inspect_template(tok)
    ps = list(load_personas(bundled.personas_file()).values())[:personas]
    qs = load_questions(bundled.eval_questions_file())[:questions]
    return [
        render(
            tok,
            [{"role": "user", "content": q.text}],
            SystemPrompt("text", p.system_prompt),
            report,
            add_generation_prompt=True,
        )
        for p in ps
        for q in qs
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--personas", type=int, default=3)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--single-rows", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_start = os.getloadavg()[0]
    resolved = models.ensure_prepared(args.model)
    tok = models.load_tokenizer(resolved)
    model = models.load_model(resolved)
    prompts = _prompts(tok, args.personas, args.questions)
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, n=args.samples, batch_size=args.batch_size, seed=1
    )
    total = len(prompts) * cfg.n
    generate_hf(model, tok, prompts[:1], GenerationConfig(max_new_tokens=4))  # warm-up

    t = time.monotonic()
    batched = generate_hf(model, tok, prompts, cfg)
    hf_batched_s = time.monotonic() - t

    # One (prompt, sample) row per generate call: batch_size 1 over the first rows.
    single_prompts = args.single_rows // cfg.n or 1
    t = time.monotonic()
    single = generate_hf(model, tok, prompts[:single_prompts], GenerationConfig(
        **{**cfg.to_dict(), "batch_size": 1}))  # fmt: skip
    hf_single_s = time.monotonic() - t
    del model

    timings: dict[str, float] = {}
    t = time.monotonic()
    vllm = generate_vllm(resolved, prompts, cfg, timings=timings)
    vllm_total_s = time.monotonic() - t

    def tokens(cs) -> int:
        return sum(c.n_tokens for c in cs)

    rows = {
        "hf batched": (len(batched), hf_batched_s, tokens(batched)),
        "hf one at a time": (len(single), hf_single_s, tokens(single)),
        "vllm (generation)": (len(vllm), timings["generate_s"], tokens(vllm)),
        "vllm (incl. engine start)": (len(vllm), vllm_total_s, tokens(vllm)),
    }
    rate = {k: n / s for k, (n, s, _) in rows.items()}
    cmd = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    lines = [
        "## eval-markers generation: hf batched vs hf one at a time vs vLLM",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}, git {git_commit()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU threads, no GPU; Python "
        f"{platform.python_version()}, float32",
        f"- workload: {args.model}, {args.personas} personas x {args.questions} questions x "
        f"{args.samples} samples = {total} completions, max {args.max_new_tokens} new tokens, "
        f"temperature 1.0; hf batch size {args.batch_size}; hf one-at-a-time measured on the "
        f"first {len(single)} completions",
        f"- 1-minute load average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end (above {os.cpu_count()} means other work shared the CPUs)",
        "",
        "| backend | completions | seconds | completions/s | generated tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k, (n, s, toks) in rows.items():
        lines.append(f"| {k} | {n} | {s:.1f} | {n / s:.2f} | {toks / s:.1f} |")
    lines += [
        "",
        f"- hf batched / hf one at a time: **{rate['hf batched'] / rate['hf one at a time']:.1f}x**"
        " (goal >= 5x)",
        f"- vllm / hf batched: **{rate['vllm (generation)'] / rate['hf batched']:.1f}x** "
        f"generation only, {rate['vllm (incl. engine start)'] / rate['hf batched']:.2f}x "
        f"including the {timings['engine_start_s']:.0f} s engine start (goal >= 2x)",
    ]
    publish("bench_eval", lines, write=args.write)


if __name__ == "__main__":
    main()
