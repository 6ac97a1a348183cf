"""Judged pairs: which (positive, negative) answer pairs a trait vector keeps (`trait --filter-by`).

safety-research/persona_vectors builds a trait vector only from the answers that show the
contrast: the i-th answer under the positive system prompt and the i-th under the negative one
form a pair, kept when the positive answer's trait score is >= T, the negative's is < 100 - T,
and both answers' coherence is >= C (T = C = 50 there). Here a pair is (question id, sample
index) of an extract run's answers, the scores come from a judge-align run over exactly those
answers (its input was the extract run's samples, or the eval-markers run they were read from),
and the trait score is the judge's `aligned` score or `misaligned` = 100 - aligned.

An answer the judge left unscored (null) fails its test: the pair is dropped, with the reason
in its row. A judge run that lacks an answer, or judged a different text for it, is an error
(the two runs do not describe the same answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_jsonl
from persona_cli.errors import UserError
from persona_cli.schemas import JUDGED_PAIRS, JUDGMENTS, SAMPLES

JUDGE_COMMAND = "judge-align"
JUDGMENTS_FILE = "judgments.jsonl.gz"
TRAIT_METRICS = ("misaligned", "aligned")
PAIRS_VERSION = JUDGED_PAIRS.version

Answer = tuple[str, str, int]  # persona, question id, sample index


@dataclass(frozen=True)
class PairRule:
    metric: str  # one of TRAIT_METRICS
    trait_threshold: float
    coherence_threshold: float


@dataclass(frozen=True)
class JudgedPairs:
    rows: list[dict[str, Any]]  # one per pair, kept or not, with the scores and reason
    kept: list[tuple[str, int]]  # (question id, sample index) of the kept pairs
    texts: dict[Answer, tuple[str, str]]  # answer -> (user turn, answer text)


def _trait_score(aligned: float | None, metric: str) -> float | None:
    if aligned is None:
        return None
    return 100.0 - aligned if metric == "misaligned" else aligned


def judged_pairs(
    samples_path: Path,
    judge_run: Path,
    positive: str,
    negative: str,
    question_ids: list[str],
    rule: PairRule,
) -> JudgedPairs:
    """Pair the two personas' answers on the extract's questions and apply the rule."""
    if rule.metric not in TRAIT_METRICS:
        raise UserError(f"--trait-metric {rule.metric!r}: choose from {', '.join(TRAIT_METRICS)}")
    texts: dict[Answer, tuple[str, str]] = {}
    for row in read_jsonl(samples_path, SAMPLES.check):
        if row["persona"] in (positive, negative) and row["question_id"] in question_ids:
            key = (row["persona"], row["question_id"], row["sample_index"])
            texts[key] = (row["question"], row["text"])
    scores: dict[tuple[Answer, str], float | None] = {}
    for row in read_jsonl(judge_run / JUDGMENTS_FILE, JUDGMENTS.check):
        key = (row["persona"], row["question_id"], row["sample_index"])
        if key not in texts:
            continue
        if row["answer"] != texts[key][1]:
            raise UserError(
                f"--filter-by {judge_run}: judged another text for {'/'.join(map(str, key))} "
                f"than {samples_path} holds (not a judge run of these answers)"
            )
        scores[(key, row["metric"])] = row["score"]
    rows, kept = [], []
    for qid, si in sorted({(k[1], k[2]) for k in texts if k[0] == positive}):
        pos, neg = (positive, qid, si), (negative, qid, si)
        if neg not in texts:
            continue  # the negative persona has fewer samples of this question
        for key in (pos, neg):
            for metric in ("aligned", "coherent"):
                if (key, metric) not in scores:
                    raise UserError(
                        f"--filter-by {judge_run}: has no {metric!r} judgment of "
                        f"{'/'.join(map(str, key))} (judge the extract run's answers with "
                        "both metrics)"
                    )
        p_trait = _trait_score(scores[(pos, "aligned")], rule.metric)
        n_trait = _trait_score(scores[(neg, "aligned")], rule.metric)
        p_coh, n_coh = scores[(pos, "coherent")], scores[(neg, "coherent")]
        reason = None
        if p_trait is None or n_trait is None or p_coh is None or n_coh is None:
            reason = "unscored"
        elif p_trait < rule.trait_threshold:
            reason = "positive_trait_low"
        elif n_trait >= 100.0 - rule.trait_threshold:
            reason = "negative_trait_high"
        elif min(p_coh, n_coh) < rule.coherence_threshold:
            reason = "incoherent"
        if reason is None:
            kept.append((qid, si))
        rows.append(
            {"question_id": qid, "sample_index": si, "positive_trait": p_trait,
             "negative_trait": n_trait, "positive_coherent": p_coh,
             "negative_coherent": n_coh, "kept": reason is None, "reason": reason}
        )  # fmt: skip
    if not kept:
        raise UserError(
            f"--filter-by {judge_run}: none of the {len(rows)} pairs passes (trait "
            f"{rule.metric} >= {rule.trait_threshold} for {positive}, < "
            f"{100 - rule.trait_threshold} for {negative}, coherence >= "
            f"{rule.coherence_threshold} for both)"
        )
    return JudgedPairs(rows, kept, texts)
