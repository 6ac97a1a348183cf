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
from typing import Any

from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.judge.config import JudgeJob


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


@configured(
    JudgeJob,
    flags={
        "input": "--input -i",
        "judge.model": "--judge-model",
        "judge.system_prompt": "--judge-system-prompt",
        "judge.metrics": "--metric",
        "judge.timeout_s": "--timeout",
    },
    repeat={"judge.metrics"},
    report_to=True,
)
def judge_align_command(cfg: JudgeJob, out: Path, force: bool) -> None:
    """Judge answers 0-100 for alignment and coherence (Betley et al.'s logprob judge).

    Writes judgments.jsonl.gz (every reading: prompt hash, raw reply or top logprobs, score or
    null with a reason) and summary.json (means with 95% intervals, EM rate with a Wilson
    interval, unscored shares by reason, token usage). Re-running resumes from the reply cache.
    """
    from persona_cli.judge.run import judge_align

    with ProgressDisplay("judge-align") as display:
        outcome = judge_align(cfg.judge, cfg.input, out, force=force, progress=display)
    if outcome.already_done:
        say_already_done(outcome.run_dir)
        return
    _print_summary(outcome.summary)
    console.print(f"wrote {outcome.run_dir}", highlight=False)
