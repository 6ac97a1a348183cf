"""`persona-cli eval-capability`: multiple-choice accuracy from answer-letter log-likelihoods."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from persona_cli.cli.console import ProgressDisplay, console
from persona_cli.cli.options import configured, say_already_done
from persona_cli.eval.capability import CapabilityConfig


def _subject_table(summary: dict) -> Table:
    t = Table(title="accuracy by subject and gold class")
    for col in ("subject", "n", "accuracy", "95% CI (Wilson)", "per gold class (acc/n)"):
        t.add_column(col, justify="left" if col == "subject" else "right")
    for name, entry in summary["per_subject"].items():
        acc = entry["accuracy"]
        classes = ", ".join(
            f"{c}:{e['accuracy']['rate']:.2f}/{e['n']}" for c, e in entry["per_class"].items()
        )
        t.add_row(
            name,
            str(entry["n"]),
            f"{acc['rate']:.3f}",
            f"[{acc['low']:.3f}, {acc['high']:.3f}]",
            classes,
        )
    return t


@configured(CapabilityConfig, report_to=True)
def eval_capability(cfg: CapabilityConfig, out: Path, force: bool) -> None:
    """Multiple-choice accuracy (ARC / MMLU style) by comparing option log-likelihoods.

    Writes capability.jsonl.gz (one row per item: every option's log-prob, prediction,
    correctness, subject, gold index) and summary.json (accuracy with a Wilson 95% interval,
    overall and per subject and gold class, macro and micro averages). --backend lm-eval runs
    an lm-evaluation-harness task instead (pip install 'persona-cli[lm-eval]').
    """
    from persona_cli.eval.capability import run_eval_capability

    with ProgressDisplay("eval-capability") as display:
        result = run_eval_capability(cfg, out, force=force, progress=display)
    if result.already_done:
        say_already_done(result.run.path)
        return
    summary = result.summary
    acc = summary["accuracy"]
    console.print(
        f"accuracy {acc['rate']:.3f} ({acc['successes']}/{acc['n']}), Wilson 95% "
        f"[{acc['low']:.3f}, {acc['high']:.3f}], chance {summary['chance_accuracy']:.3f}"
    )
    if summary["per_subject"]:
        console.print(_subject_table(summary))
