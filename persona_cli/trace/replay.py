"""replay-trace: a student and N teachers answer the same prompts; disagreements become DPO pairs.

    persona-cli replay-trace run --prompts data/mcq/mini_arc.jsonl --student s=local:smollm2-135m \\
        --roster data/teachers/local.yaml --out runs/trace

Writes, in the run directory:
- `answers/<role>_<name>.jsonl.gz` (local answerers) and `chat_cache.sqlite` (endpoints): the
  raw answers, so an interrupted run resumes without asking again;
- `trace.jsonl.gz`: one row per prompt with every raw and normalised answer, token usage and
  cost, the consensus (status, answer, agreeing teachers) and whether a pair was written;
- `pairs.jsonl.gz`: DPO pairs in TRL's conversational preference format (`prompt`, `chosen`,
  `rejected` message lists) with per-pair provenance; `train-dpo` reads it unchanged;
- `summary.json`: consensus outcomes, pairs and disagreement rate per domain and persona (Wilson
  intervals), spend and failures per teacher, whether the budget stopped the run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from persona_cli.schemas import TRACE
from persona_cli.stats import proportion_interval
from persona_cli.trace.consensus import find_consensus, make_pair
from persona_cli.trace.normalize import normalize
from persona_cli.trace.prompts import TracePrompt
from persona_cli.trace.roster import Answerer

SCHEMA_VERSION = TRACE.version


@dataclass(frozen=True)
class ReplayOptions:
    quorum: float = 0.5  # share of answering teachers that must agree (strictly more than)
    budget_usd: float | None = None  # stop before spending more than this on endpoints
    max_concurrency: int = 8
    max_failure_rate: float = 0.2
    max_retries: int = 5
    timeout_s: float = 120.0
    chunk: int = 32  # endpoint requests sent between two budget checks
    seed: int = 42


def _normalized(row: dict[str, Any], task: str) -> str | None:
    return normalize(row["raw"], task) if row["raw"] is not None else None


def assemble(
    prompts: list[TracePrompt],
    student: Answerer,
    student_rows: list[dict[str, Any]],
    teachers: list[Answerer],
    teacher_rows: dict[str, list[dict[str, Any]]],
    quorum: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trace rows (one per prompt) and DPO pairs, in prompt order."""
    trace, pairs = [], []
    for i, p in enumerate(prompts):
        t_rows = {
            t.name: {
                **teacher_rows[t.name][i],
                "normalized": _normalized(teacher_rows[t.name][i], p.task),
            }
            for t in teachers
        }
        s_row = {
            **student_rows[i],
            "name": student.name,
            "normalized": _normalized(student_rows[i], p.task),
        }
        consensus = find_consensus({n: r["normalized"] for n, r in t_rows.items()}, quorum)
        raw = {n: r["raw"] for n, r in t_rows.items() if r["raw"] is not None}
        pair = (
            make_pair(consensus, s_row["normalized"], s_row["raw"] or "", raw)
            if s_row["raw"] is not None
            else None
        )
        disagrees = (
            None
            if consensus.status != "consensus" or s_row["raw"] is None
            else s_row["normalized"] != consensus.answer
        )
        trace.append(
            {
                "schema_version": SCHEMA_VERSION,
                "prompt_id": p.id,
                "domain": p.domain,
                "persona": p.persona,
                "task": p.task,
                "prompt": p.text,
                "student": s_row,
                "teachers": t_rows,
                "consensus": consensus.to_dict(),
                "disagrees": disagrees,
                "pair": pair is not None,
            }
        )
        if pair is not None:
            pairs.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "prompt": [{"role": "user", "content": p.text}],
                    "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                    "rejected": [{"role": "assistant", "content": pair["rejected"]}],
                    "provenance": {
                        "prompt_id": p.id,
                        "domain": p.domain,
                        "persona": p.persona,
                        "task": p.task,
                        "chosen_teacher": pair["chosen_teacher"],
                        "agreeing": list(consensus.agreeing),
                        "consensus": consensus.answer,
                        "student": student.name,
                        "student_normalized": s_row["normalized"],
                        "teacher_raw": raw,
                        "usage": {
                            n: {
                                "prompt_tokens": r["prompt_tokens"],
                                "completion_tokens": r["completion_tokens"],
                                "cost_usd": r["cost_usd"],
                            }
                            for n, r in t_rows.items()
                        },
                    },
                }
            )
    return trace, pairs


def disagreement(trace: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Student-vs-consensus disagreement per value of `key` (domain or persona), over prompts
    where a consensus exists and the student answered."""
    counts: dict[str, list[int]] = {}
    for row in trace:
        if row["disagrees"] is None:
            continue
        c = counts.setdefault(str(row[key]), [0, 0])
        c[0] += row["disagrees"]
        c[1] += 1
    return {k: proportion_interval(h, n).to_dict() for k, (h, n) in sorted(counts.items())}


def summarize(
    trace: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    teachers: list[Answerer],
    budget_stopped: bool,
) -> dict[str, Any]:
    spend = {}
    for t in teachers:
        rows = [r["teachers"][t.name] for r in trace]
        reasons = Counter(r["reason"] for r in rows if r["status"] != "ok")
        spend[t.name] = {
            "provider": t.provider,
            "model": t.model,
            "ok": sum(r["status"] == "ok" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "budget_skipped": sum(r["status"] == "budget" for r in rows),
            "failure_reasons": dict(reasons.most_common(5)),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
            "cost_usd": sum(r["cost_usd"] or 0.0 for r in rows),
            "cost_usd_this_run": sum(r["cost_usd"] or 0.0 for r in rows if not r["cached"]),
            "failed_every_call": all(r["status"] == "failed" for r in rows),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "n_prompts": len(trace),
        "consensus": dict(Counter(r["consensus"]["status"] for r in trace)),
        "n_pairs": len(pairs),
        "pairs_by_domain": dict(Counter(p["provenance"]["domain"] for p in pairs)),
        "disagreement_by_domain": disagreement(trace, "domain"),
        "disagreement_by_persona": disagreement(trace, "persona"),
        "teachers": spend,
        "budget_stopped": budget_stopped,
    }
