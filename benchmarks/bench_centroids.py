"""persona-vectors extract throughput: batched (left-padded, length-sorted) vs one at a time.

The same workload for both paths, in one process: SmolLM2-135M, P personas x Q open-eval
questions rendered through the chat-template guard with each persona's system prompt, the
prompt-last hidden states at every layer (the forward passes both centroid methods run).
"one at a time" is `persona_cli.geometry.hidden.hidden_states` with batch size 1: one
conversation per forward pass, no padding. Each path runs `--rounds` times, alternating
(A B B A ...), after one warm-up pass; the figures are medians of conversations/s, and the
speed-up is also given per round (batched / one at a time of the same round, run back to back),
whose median is less sensitive to other work on a shared machine than the ratio of medians.

    python benchmarks/bench_centroids.py --write    # updates the bench_centroids section
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

from bench_eval import eval_prompts
from machine import cpu_name, git_commit, load_average, publish

from persona_cli import models
from persona_cli.geometry.hidden import Span, hidden_states


def conversations(tok, personas: int, questions: int) -> list[list[int]]:
    """eval-markers' prompts (personas x questions, rendered) as token ids."""
    return [
        tok(s, add_special_tokens=False)["input_ids"]
        for s in eval_prompts(tok, personas, questions)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=models.EMBEDDED)
    ap.add_argument("--personas", type=int, default=4)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()

    load_start = load_average()
    started = time.monotonic()
    resolved = models.ensure_prepared(args.model)
    tok = models.load_tokenizer(resolved)
    net = models.load_model(resolved)
    ids = conversations(tok, args.personas, args.questions)
    spans = [Span(s, 1) for s in ids]
    layers = list(range(net.config.num_hidden_layers + 1))
    pad = tok.pad_token_id
    hidden_states(net, spans[:2], layers, batch_size=2, pad_id=pad)  # warm-up

    paths = {"batched": args.batch_size, "one at a time": 1}
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    order = [
        p for r in range(args.rounds) for p in (list(paths) if r % 2 == 0 else list(paths)[::-1])
    ]
    for path in order:
        t = time.monotonic()
        hidden_states(net, spans, layers, batch_size=paths[path], pad_id=pad)
        seconds[path].append(time.monotonic() - t)

    def rate(path: str) -> float:
        return statistics.median(len(spans) / s for s in seconds[path])

    lengths = sorted(len(s) for s in ids)
    cmd = "python benchmarks/bench_centroids.py " + " ".join(sys.argv[1:])
    lines = [
        "## persona-vectors extract: batched vs one conversation at a time",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}, git {git_commit()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU threads, no GPU; Python "
        f"{platform.python_version()}, torch threads {__import__('torch').get_num_threads()}, "
        "float32",
        f"- workload: {args.model}, {args.personas} personas x {args.questions} questions = "
        f"{len(spans)} conversations (prompt tokens {lengths[0]}..{lengths[-1]}), prompt-last "
        f"hidden states at all {len(layers)} layers; batched: batch size {args.batch_size}, "
        f"left-padded, length-sorted; {args.rounds} rounds per path, alternating; total wall "
        f"time {time.monotonic() - started:.0f} s",
        f"- load average (1, 5, 15 min): {load_start} at the start, {load_average()} at the end "
        f"(above {os.cpu_count()} means other work shared the CPUs)",
        "",
        "| path | conversations | median conversations/s | each round (s) |",
        "| --- | ---: | ---: | --- |",
    ]
    for path in paths:
        each = ", ".join(f"{s:.2f}" for s in seconds[path])
        lines.append(f"| {path} | {len(spans)} | {rate(path):.2f} | {each} |")
    per_round = [o / b for b, o in zip(seconds["batched"], seconds["one at a time"], strict=True)]
    lines += [
        "",
        f"- batched / one at a time: **{rate('batched') / rate('one at a time'):.1f}x** "
        f"(ratio of medians; per round {', '.join(f'{r:.1f}' for r in per_round)}, median "
        f"{statistics.median(per_round):.1f}x; goal >= 4x)",
    ]
    publish("bench_centroids", lines, write=args.write)


if __name__ == "__main__":
    main()
