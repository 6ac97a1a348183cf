"""eval-markers generation throughput: hf batched vs hf one prompt at a time vs vLLM.

The same workload for all three (SmolLM2-135M, P personas x Q questions x K samples, the
eval-markers prompts rendered through the chat-template guard), run in one process, so the
ratios compare like with like on the same machine at the same moment. The workload runs
`--rounds` times, each round on its own P personas (round r uses personas r*P .. r*P+P-1 of the
registry), so vLLM's prefix cache cannot reuse one round's prompts in the next; the figures are
medians over the rounds, each run listed. hf one-at-a-time (batch size 1) runs on the first
`--single-rows` completions of each round only, because it is the slow baseline; completions/s
is a rate, so the subset is fair as long as it is long enough. vLLM runs the rounds as groups of
one engine (the worker times each group) and is also reported with its engine start.

    python benchmarks/bench_eval.py --write        # updates the eval section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

from machine import cpu_name, git_commit, publish

from persona_cli import bundled, models
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.generate import GenerationConfig, VllmConfig, generate_hf, generate_vllm_groups
from persona_cli.generate.vllm import engine_env
from persona_cli.registry import load_personas, load_questions


def eval_prompts(tok, personas: int, questions: int, first_persona: int = 0) -> list[str]:
    """eval-markers' prompts: each persona's system prompt x each open-eval question, rendered."""
    report = inspect_template(tok)
    registry = list(load_personas(bundled.personas_file()).values())
    ps = registry[first_persona : first_persona + personas]
    if len(ps) < personas:
        raise SystemExit(f"the registry has {len(registry)} personas; this needs more")
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


def _timed(fn, *args):
    t = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--personas", type=int, default=3)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--single-rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_start = os.getloadavg()[0]
    started = time.monotonic()
    resolved = models.ensure_prepared(args.model)
    tok = models.load_tokenizer(resolved)
    model = models.load_model(resolved)
    rounds = [eval_prompts(tok, args.personas, args.questions, r * args.personas)
              for r in range(args.rounds)]  # fmt: skip
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, n=args.samples, batch_size=args.batch_size, seed=1
    )
    single_cfg = GenerationConfig(**{**cfg.to_dict(), "batch_size": 1})
    single_prompts = args.single_rows // cfg.n or 1
    total = len(rounds[0]) * cfg.n
    generate_hf(model, tok, rounds[0][:1], GenerationConfig(max_new_tokens=4))  # warm-up

    # (completions, seconds, generated tokens) per round and path
    runs: dict[str, list[tuple[int, float, int]]] = {"hf batched": [], "hf one at a time": []}
    for prompts in rounds:
        batched, s = _timed(generate_hf, model, tok, prompts, cfg)
        runs["hf batched"].append((len(batched), s, sum(c.n_tokens for c in batched)))
        single, s = _timed(generate_hf, model, tok, prompts[:single_prompts], single_cfg)
        runs["hf one at a time"].append((len(single), s, sum(c.n_tokens for c in single)))
    del model

    timings: dict[str, float] = {}
    groups, vllm_total_s = _timed(
        lambda: generate_vllm_groups(resolved, rounds, cfg, timings=timings)
    )
    runs["vllm (generation)"] = [
        (len(g), timings[f"group_{r}_s"], sum(c.n_tokens for c in g)) for r, g in enumerate(groups)
    ]
    n_all = sum(len(g) for g in groups)
    with_start = (n_all, vllm_total_s, sum(c.n_tokens for g in groups for c in g))

    def rate(path: str) -> float:
        return statistics.median(n / s for n, s, _ in runs[path])

    cmd = "python benchmarks/bench_eval.py " + " ".join(sys.argv[1:])
    env = ", ".join(f"{k}={v}" for k, v in engine_env(VllmConfig()).items())
    lines = [
        "## eval-markers generation: hf batched vs hf one at a time vs vLLM",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}, git {git_commit()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU threads, no GPU; Python "
        f"{platform.python_version()}, float32; vLLM worker env: {env}",
        f"- workload per round: {args.model}, {args.personas} personas x {args.questions} "
        f"questions x {args.samples} samples = {total} completions, max {args.max_new_tokens} new "
        f"tokens, temperature 1.0; hf batch size {args.batch_size}; hf one-at-a-time on the first "
        f"{runs['hf one at a time'][0][0]} completions of each round; {args.rounds} rounds, each "
        "on other personas; total wall time "
        f"{time.monotonic() - started:.0f} s",
        f"- 1-minute load average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
        f"the end (above {os.cpu_count()} means other work shared the CPUs)",
        "",
        "| path | completions per round | median completions/s | each round (s) | generated "
        "tokens/s (median) |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for path, rs in runs.items():
        each = ", ".join(f"{s:.1f}" for _, s, _ in rs)
        toks = statistics.median(t / s for _, s, t in rs)
        lines.append(f"| {path} | {rs[0][0]} | {rate(path):.2f} | {each} | {toks:.1f} |")
    n, s, toks = with_start
    lines.append(
        f"| vllm (all rounds incl. engine start) | {n} in all | {n / s:.2f} | {s:.1f} | "
        f"{toks / s:.1f} |"
    )
    lines += [
        "",
        f"- hf batched / hf one at a time: **{rate('hf batched') / rate('hf one at a time'):.1f}x**"
        " (goal >= 5x)",
        f"- vllm / hf batched: **{rate('vllm (generation)') / rate('hf batched'):.1f}x** "
        f"generation only (goal >= 2x); the engine start took {timings['engine_start_s']:.0f} s",
    ]
    publish("bench_eval", lines, write=args.write)


if __name__ == "__main__":
    main()
