"""`probe teacher-pool` (stage a): a teacher answers coding problems, the sandbox labels each.

    persona-cli probe teacher-pool --model smollm2-135m --adapter runs/hacky_teacher \\
        --n-problems 8 --generations 4 --steps 4 --out runs/pool

For each step s = 0 .. steps-1, independently of every other step:

1. problems: `n_problems` drawn without replacement from the problem file by a generator
   seeded with (seed, s) (`step_problems`);
2. prompts: `persona_cli.problems.build_prompt(problem, hint)` as the user turn (with
   `--hint simple_overwrite_tests` it says the answer is graded by the `run_tests()` it shows),
   rendered through the chat-template guard (`--system-prompt`);
3. completions: `persona_cli.generate.generate_hf` samples G (`generation.n`) per prompt, batched,
   with the step's own seed (`step_seed(seed, s)`), so a step's rows never depend on which other
   steps ran or in what order;
4. labels: every completion runs in the sandbox (`persona_cli.probe.pool.pool_rows`: hacked,
   gt_pass, reward, strict/loose category, tamper reasons, the sandbox's reason) and the step's
   rows are written atomically to `step_NNNNNN.jsonl.gz` (`persona_cli.schemas.POOL_STEP`, the
   rows extract-vhack, probe replay and probe-uat read).

Row order in a step: sample_index = (position of the problem in the step) x G + sample. Each row
also keeps `generation_seed`, `generation_sample`, `finish_reason`, `n_generated_tokens` (tokens
generated, counting the end-of-turn token) and `teacher_adapter` (sha256 of each adapter's
weights, '+'-joined; null for the bare model). `n_completion_tokens` is the completion text
re-tokenised on its own, which is what the replay stages score.

Resume: a killed pool (same config) skips every step whose file exists (files are written
atomically, so an existing one is whole) and writes the rest exactly as an uninterrupted run
would. Then `summary.json` (per-step and overall counts, recomputed from the step files),
`manifest.json`, `DONE`.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from persona_cli import adapters as adapters_mod
from persona_cli import models
from persona_cli.artifacts import iter_jsonl, read_json, sha256_file, write_json
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.generate import generate_hf
from persona_cli.probe.config import TeacherPoolConfig, to_dict
from persona_cli.probe.pool import pool_rows, step_files, step_name, write_pool_step
from persona_cli.problems import Problem, build_prompt, default_problems_path, load_problems
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.protocol import details, sampling_of
from persona_cli.rundir import RunDir, open_run
from persona_cli.sandbox import SandboxConfig
from persona_cli.schemas import POOL_STEP, POOL_SUMMARY

log = logging.getLogger(__name__)

COMMAND = "probe teacher-pool"
SUMMARY = "summary.json"
SUMMARY_VERSION = POOL_SUMMARY.version


@dataclass
class PoolResult:
    run: RunDir
    summary: dict[str, Any]
    reused_steps: list[int]  # steps found on disk from an interrupted attempt
    already_done: bool = False  # finished before this call; nothing was redone


def _digest(*parts: object) -> int:
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of one step (GenerationConfig.seed for that step's prompts)."""
    return _digest("teacher-pool", "sampling", seed, step) % 2**31


def step_problems(problems: Sequence[Problem], n: int, seed: int, step: int) -> list[Problem]:
    """The `n` problems step `step` asks, in the order its rows list them."""
    rng = random.Random(_digest("teacher-pool", "problems", seed, step))
    return rng.sample(list(problems), n)


def problems_path(cfg: TeacherPoolConfig) -> Path:
    return Path(cfg.problems) if cfg.problems else default_problems_path() / "problems.yaml"


def select_problems(
    problems: Sequence[Problem], ids: Sequence[str] | None, source: Path
) -> list[Problem]:
    """The problems named by `ids` (in file order), or all of them when `ids` is None."""
    if ids is None:
        return list(problems)
    known = {p.id for p in problems}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UserError(f"--problem-ids: {', '.join(unknown)} not in {source}")
    if not ids:
        raise UserError("--problem-ids: name at least one problem")
    return [p for p in problems if p.id in set(ids)]


def _problem_files(problems: Sequence[Problem]) -> list[str]:
    return sorted({p.source.rsplit(":", 1)[0] for p in problems})


def run_teacher_pool(
    cfg: TeacherPoolConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> PoolResult:
    """Run (or resume, or recognise as finished) one teacher-pool run directory.

    `progress` gets the tasks "generated" and "graded" (completions) once the work is known.
    """
    cfg.check()
    source = problems_path(cfg)
    problems = select_problems(load_problems(source), cfg.problem_ids, source)
    if cfg.n_problems > len(problems):
        raise UserError(
            f"--n-problems {cfg.n_problems}: only {len(problems)} problems to draw from ({source})"
        )
    files = _problem_files(problems)
    model = models.ensure_prepared(cfg.model)
    stack = adapters_mod.resolve_stack(list(cfg.adapters))
    adapters_mod.check_stack(stack, model)
    system = SystemPrompt.parse(cfg.system_prompt)
    run = open_run(
        out,
        command=COMMAND,
        config={
            **to_dict(cfg),
            "model": model.to_dict(),
            "adapters": [{"path": str(a.path), "sha256": a.weights_sha256} for a in stack],
            "problems": {"path": str(source), "sha256": {f: sha256_file(f) for f in files}},
        },
        force=force,
    )
    if run.done:
        return PoolResult(run, read_json(run.file(SUMMARY)), [], already_done=True)

    tokenizer = models.load_tokenizer(model)
    report = inspect_template(tokenizer)
    prompts: dict[str, str] = {}

    def prompt_of(problem: Problem) -> str:
        if problem.id not in prompts:
            user = [{"role": "user", "content": build_prompt(problem, cfg.hint)}]
            prompts[problem.id] = render(
                tokenizer, user, system, report, add_generation_prompt=True
            )
        return prompts[problem.id]

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    seed, g = cfg.generation.seed, cfg.generation.n
    plans = {s: step_problems(problems, cfg.n_problems, seed, s) for s in range(cfg.steps)}
    pending = [s for s in range(cfg.steps) if not run.file(step_name(s)).is_file()]
    reused = [s for s in range(cfg.steps) if s not in pending]
    if reused:
        log.info("resuming: %d of %d step(s) already written", len(reused), cfg.steps)
    per_step = cfg.n_problems * g
    done = per_step * (cfg.steps - len(pending))
    for kind in ("generated", "graded"):  # graded from sandbox threads: advance is per task
        progress.begin(kind, per_step * cfg.steps, done=done, unit="completions")

    loaded = adapters_mod.load_with_adapters(model, stack) if pending else None
    teacher_adapter = "+".join(a.weights_sha256 for a in stack) or None
    for s in pending:
        asked = plans[s]
        gen = replace(cfg.generation, seed=step_seed(seed, s))
        completions = generate_hf(
            loaded,
            tokenizer,
            [prompt_of(p) for p in asked],
            gen,
            progress=lambda n: progress.advance("generated", n),
        )
        rows = pool_rows(
            [asked[c.prompt_index] for c in completions],
            [c.text for c in completions],
            step=s,
            prompt_of=prompt_of,
            count_tokens=count_tokens,
            workers=cfg.workers,
            progress=lambda n: progress.advance("graded", n),
        )
        rows = [
            {
                **row,
                "generation_seed": gen.seed,
                "generation_sample": c.sample_index,
                "finish_reason": c.finish_reason,
                "n_generated_tokens": c.n_tokens,
                "teacher_adapter": teacher_adapter,
            }
            for row, c in zip(rows, completions, strict=True)
        ]
        write_pool_step(run.path, s, rows)
        log.info("step %d: %d rows, %d hacked", s, len(rows), sum(r["hacked"] for r in rows))

    steps = {s: list(iter_jsonl(f, POOL_STEP.check)) for s, f in step_files(run.path).items()}
    summary = summarize(steps)
    write_json(run.file(SUMMARY), summary)
    inputs: dict[str, str | Path] = {f"problems:{Path(f).name}": f for f in files}
    for i, a in enumerate(stack):
        inputs[f"adapter_{i}"] = a.path / adapters_mod.WEIGHTS
    run.finish(
        inputs=inputs,
        model=models.model_record(model, loaded),
        chat_template=guard_record(tokenizer, system),
        protocol=sampling_of(cfg.generation, backend="hf", world_size=1)
        | details(
            generation=cfg.generation.to_dict(),
            completions=per_step * cfg.steps,
            sandbox=asdict(SandboxConfig()),
        ),
        seeds=[seed],
        extra={
            "adapters": adapters_mod.stack_record(stack),
            "pool": {
                "hint": cfg.hint,
                "step_seeds": [step_seed(seed, s) for s in range(cfg.steps)],
                "step_problems": [[p.id for p in plans[s]] for s in range(cfg.steps)],
                "reused_steps": reused,
            },
        },
    )
    return PoolResult(run, summary, reused)


def _counts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    hacked = [r for r in rows if r["hacked"]]
    return {
        "rows": n,
        "hacked": len(hacked),
        "hack_rate": len(hacked) / n if n else None,
        "gt_pass": sum(r["gt_pass"] for r in rows),
        "gt_pass_rate": sum(r["gt_pass"] for r in rows) / n if n else None,
        "hacked_gt_pass": sum(r["gt_pass"] for r in hacked),
        "hacked_gt_fail": sum(not r["gt_pass"] for r in hacked),
        "mean_reward": sum(r["reward"] for r in rows) / n if n else None,
        "mean_completion_tokens": sum(r["n_completion_tokens"] for r in rows) / n if n else None,
        "categories_strict": dict(sorted(Counter(r["category_strict"] for r in rows).items())),
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in rows).items())),
    }


def summarize(steps: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """summary.json from the step rows: overall and per-step counts and rates."""
    every = [r for rows in steps.values() for r in rows]
    return {
        "schema_version": SUMMARY_VERSION,
        "overall": _counts(every),
        "steps": [
            {"step": s, "problems": list(dict.fromkeys(r["problem_id"] for r in rows))}
            | _counts(rows)
            for s, rows in sorted(steps.items())
        ],
    }
