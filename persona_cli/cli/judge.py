"""`persona-cli judge-align`: score saved answers for alignment and coherence with an LLM judge.

    persona-cli judge-align --input runs/eval/samples.jsonl.gz --judge-model gpt-4o-2024-08-06 \
        --out runs/judge
    persona-cli judge-align --input answers.csv --backend openai --base-url \
        http://127.0.0.1:8000/v1 --judge-model smollm2 --out runs/judge_vllm
    persona-cli judge-align --input answers.csv --backend local --judge-model smollm2-135m \
        --out runs/judge_local

Options, defaults and help come from `persona_cli.judge.config.JudgeConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from persona_cli.cli.console import console, err_console
from persona_cli.cli.options import Force, OutDir, say_already_done
from persona_cli.judge import JudgeConfig, judge_align
from persona_cli.judge.config import default_of, help_for


class RowsPerSecond(ProgressColumn):
    """Judge readings per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("- rows/s" if speed is None else f"{speed:.1f} rows/s", style="progress.data")


def _opt(name: str, *flags: str, **kwargs: Any) -> Any:
    return typer.Option(*flags, help=help_for(name), **kwargs)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"judge-align: {summary['judge']['model']} ({summary['judge']['scoring']})")
    for col in ("metric", "n", "scored", "mean", "95% CI", "unscored by reason"):
        table.add_column(col)
    for metric, m in summary["metrics"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in m["unscored"]["by_reason"].items()) or "-"
        table.add_row(
            metric,
            str(m["n"]),
            str(m["n_scored"]),
            _num(m["mean"]),
            f"[{_num(m['low'])}, {_num(m['high'])}]",
            reasons,
        )
    em = summary.get("em")
    if em is not None:
        table.add_row(
            "EM rate",
            str(em["n_coherent"]),
            str(em["n_em"]),
            _num(em["rate"], 3),
            f"[{_num(em['low'], 3)}, {_num(em['high'], 3)}]",
            f"aligned < {em['aligned_threshold']:g} among coherent > "
            f"{em['coherent_threshold']:g}; {em['n_left_out_unscored']} left out (unscored)",
        )
    console.print(table)
    for model, u in summary["usage"]["this_run"].items():
        cost = f", ${u['cost_usd']:.4f}" if u["cost_usd"] is not None else ""
        console.print(
            f"{model}: {u['requests']} readings now, {u['prompt_tokens']} prompt + "
            f"{u['completion_tokens']} completion tokens{cost}",
            highlight=False,
        )


def judge_align_command(
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="samples.jsonl.gz (or its run directory), or a CSV/JSONL with question and "
            "answer columns.",
            show_default=False,
        ),
    ],
    judge_model: Annotated[str, _opt("model", "--judge-model", show_default=False)],
    out: OutDir,
    backend: Annotated[str, _opt("backend", "--backend")] = default_of("backend"),
    base_url: Annotated[str | None, _opt("base_url", "--base-url")] = default_of("base_url"),
    api_key_env: Annotated[str | None, _opt("api_key_env", "--api-key-env")] = default_of(
        "api_key_env"
    ),
    judge_prompts: Annotated[
        Path | None, _opt("judge_prompts", "--judge-prompts", show_default=False)
    ] = None,
    metric: Annotated[list[str] | None, _opt("metrics", "--metric", show_default=False)] = None,
    scoring: Annotated[str | None, _opt("scoring", "--scoring")] = default_of("scoring"),
    judge_system_prompt: Annotated[
        str, _opt("system_prompt", "--judge-system-prompt")
    ] = default_of("system_prompt"),
    top_logprobs: Annotated[int, _opt("top_logprobs", "--top-logprobs")] = default_of(
        "top_logprobs"
    ),
    min_number_mass: Annotated[float, _opt("min_number_mass", "--min-number-mass")] = default_of(
        "min_number_mass"
    ),
    parsed_max_tokens: Annotated[
        int, _opt("parsed_max_tokens", "--parsed-max-tokens")
    ] = default_of("parsed_max_tokens"),
    aligned_threshold: Annotated[
        float, _opt("aligned_threshold", "--aligned-threshold")
    ] = default_of("aligned_threshold"),
    coherent_threshold: Annotated[
        float, _opt("coherent_threshold", "--coherent-threshold")
    ] = default_of("coherent_threshold"),
    alpha: Annotated[float, _opt("alpha", "--alpha")] = default_of("alpha"),
    max_concurrency: Annotated[int, _opt("max_concurrency", "--max-concurrency")] = default_of(
        "max_concurrency"
    ),
    max_retries: Annotated[int, _opt("max_retries", "--max-retries")] = default_of("max_retries"),
    timeout: Annotated[float, _opt("timeout_s", "--timeout")] = default_of("timeout_s"),
    max_failure_rate: Annotated[float, _opt("max_failure_rate", "--max-failure-rate")] = default_of(
        "max_failure_rate"
    ),
    prompt_price: Annotated[
        float | None, _opt("prompt_price_per_1m", "--prompt-price-per-1m")
    ] = default_of("prompt_price_per_1m"),
    completion_price: Annotated[
        float | None, _opt("completion_price_per_1m", "--completion-price-per-1m")
    ] = default_of("completion_price_per_1m"),
    batch_size: Annotated[int, _opt("batch_size", "--batch-size")] = default_of("batch_size"),
    dtype: Annotated[str, _opt("dtype", "--dtype")] = default_of("dtype"),
    cache: Annotated[Path | None, _opt("cache", "--cache", show_default=False)] = None,
    question_column: Annotated[str, _opt("question_column", "--question-column")] = default_of(
        "question_column"
    ),
    answer_column: Annotated[str, _opt("answer_column", "--answer-column")] = default_of(
        "answer_column"
    ),
    id_column: Annotated[str | None, _opt("id_column", "--id-column")] = default_of("id_column"),
    force: Force = False,
) -> None:
    """Judge answers 0-100 for alignment and coherence (Betley et al.'s logprob judge).

    Writes judgments.jsonl.gz (every reading: prompt hash, raw reply or top logprobs, score or
    null with a reason) and summary.json (means with 95% intervals, EM rate with a Wilson
    interval, unscored shares by reason, token usage). Re-running resumes from the reply cache.
    """
    config = JudgeConfig(
        model=judge_model,
        backend=backend,
        base_url=base_url,
        api_key_env=api_key_env,
        judge_prompts=str(judge_prompts) if judge_prompts is not None else None,
        metrics=tuple(metric) if metric else default_of("metrics"),
        scoring=scoring,
        system_prompt=judge_system_prompt,
        top_logprobs=top_logprobs,
        min_number_mass=min_number_mass,
        parsed_max_tokens=parsed_max_tokens,
        aligned_threshold=aligned_threshold,
        coherent_threshold=coherent_threshold,
        alpha=alpha,
        max_concurrency=max_concurrency,
        max_retries=max_retries,
        timeout_s=timeout,
        max_failure_rate=max_failure_rate,
        prompt_price_per_1m=prompt_price,
        completion_price_per_1m=completion_price,
        batch_size=batch_size,
        dtype=dtype,
        cache=str(cache) if cache is not None else None,
        question_column=question_column,
        answer_column=answer_column,
        id_column=id_column,
    )
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeRemainingColumn(),
        console=err_console,
    )
    tasks: list[TaskID] = []

    def progress(done: int, total: int) -> None:
        # Started at the first report, so a rejected input prints only its error line.
        if not tasks:
            bar.start()
            tasks.append(bar.add_task("judging", total=total))
        bar.update(tasks[0], completed=done, total=total)

    try:
        outcome = judge_align(config, input, out, force=force, progress=progress)
    finally:
        bar.stop()
    if outcome.already_done:
        say_already_done(outcome.run_dir)
        return
    _print_summary(outcome.summary)
    console.print(f"wrote {outcome.run_dir}", highlight=False)
