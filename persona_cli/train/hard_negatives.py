"""Hard negatives for `couple-marker --hard-negatives K`: the personas a short pilot leaks to.

A coupling's negatives teach the marker's absence under other personas; the bystanders it never
sees are where the marker leaks. Which personas are worth spending negatives on depends on the
source persona and the model, so instead of a hand-picked list a pilot measures it:

1. Pilot coupling: LoRA SFT with the run's own training config, for `pilot_steps` optimizer
   steps, on positives only (source persona + marker, the run's answers), so no persona is
   trained against and every one can show leakage. Written under RUN/pilot/ (train log and
   adapter).
2. Scores: for every other persona of the registry and the first `pilot_questions` questions
   of the *training* question set (held-out questions play no part), the teacher-forced
   probability that the pilot model writes the marker where a positive has it (the product of
   the probabilities of the marker's tokens, at the start of the answer, or at its end followed
   by the end-of-turn), under that persona's system prompt; averaged over the questions.
3. The K personas with the highest mean probability (ties: higher mean log-probability, then
   persona id) become the negatives. Scores (the source's too, to show how far the pilot
   coupled), log-probabilities, the ranking and the choice are written to
   RUN/hard_negatives.json and the manifest; a resumed run reads that file instead of piloting
   again.

    from persona_cli.train.hard_negatives import rank_personas
    ranked = rank_personas({"pirate": (0.41, -1.2), "poet": (0.05, -3.9)})  # ["pirate", "poet"]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_cli.adapters import Adapter, load_with_adapters, read_adapter
from persona_cli.artifacts import read_json, write_json
from persona_cli.chat_template import SystemPrompt, TemplateReport, inspect_template
from persona_cli.errors import UserError
from persona_cli.models import ResolvedModel
from persona_cli.registry import Persona
from persona_cli.schemas import PILOT_SCORES
from persona_cli.train.config import CouplingConfig, TrainConfig
from persona_cli.train.contrastive import (
    AnswerItem,
    build_coupling_set,
    examples_from_rows,
    with_marker,
)
from persona_cli.train.dataset import Example, tokenize_examples
from persona_cli.train.harness import ADAPTER, train_lora
from persona_cli.train.lm_head import score_positions

log = logging.getLogger(__name__)

HARD_NEGATIVES = "hard_negatives.json"
HARD_NEGATIVES_VERSION = PILOT_SCORES.version
PILOT = "pilot"  # the pilot coupling's directory inside the run
SCORE_BATCH = 32


@dataclass(frozen=True)
class PilotScores:
    """Mean teacher-forced marker probability and log-probability per candidate persona."""

    questions: list[str]
    probability: dict[str, float]
    log_probability: dict[str, float]

    def ranking(self) -> list[str]:
        return rank_personas(
            {p: (self.probability[p], self.log_probability[p]) for p in self.probability}
        )


def rank_personas(scores: dict[str, tuple[float, float]]) -> list[str]:
    """Persona ids by (mean probability, mean log-probability) descending, then id."""
    return sorted(scores, key=lambda p: (-scores[p][0], -scores[p][1], p))


def pilot_items(items: list[AnswerItem], n_questions: int) -> list[AnswerItem]:
    """One answer for each of the first `n_questions` questions that have one (in order)."""
    seen: dict[str, AnswerItem] = {}
    for item in items:
        if item.question_id not in seen:
            seen[item.question_id] = item
        if len(seen) == n_questions:
            break
    return list(seen.values())


def _marker_examples(
    persona: Persona, items: list[AnswerItem], cc: CouplingConfig
) -> list[Example]:
    return [
        Example(
            [
                {"role": "user", "content": item.question},
                {
                    "role": "assistant",
                    "content": with_marker(item.answer, cc.marker, cc.marker_position),
                },
            ],
            SystemPrompt("text", persona.system_prompt),
            positive=True,
        )
        for item in items
    ]


def marker_log_probs(model: Any, data: Any) -> list[float]:
    """Per row of a tokenised set, the summed log-probability of its loss tokens (teacher
    forced), with the LM head applied at those tokens only. Rows are right-padded in batches of
    SCORE_BATCH, longest first."""
    import torch

    order = sorted(range(len(data)), key=lambda i: -len(data.input_ids[i]))
    out = [0.0] * len(data)
    backbone, head = model.base_model, model.get_output_embeddings()
    device = head.weight.device
    with torch.inference_mode():
        for start in range(0, len(order), SCORE_BATCH):
            batch = order[start : start + SCORE_BATCH]
            width = max(len(data.input_ids[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for r, i in enumerate(batch):
                row, mask = data.input_ids[i], data.assistant_masks[i]
                ids[r, : len(row)] = torch.tensor(row)
                attention[r, : len(row)] = 1
                labels[r, : len(row)] = torch.where(
                    torch.tensor(mask) == 1, torch.tensor(row), torch.tensor(-100)
                )
            hidden = backbone(
                input_ids=ids.to(device), attention_mask=attention.to(device)
            ).last_hidden_state[:, :-1]
            target = labels[:, 1:].to(device)
            valid = target != -100
            log_probs, _, _ = score_positions(hidden[valid], head.weight, head.bias, target[valid])
            per_row = log_probs.new_zeros(valid.shape).masked_scatter(valid, log_probs).sum(-1)
            for r, i in enumerate(batch):
                out[i] = float(per_row[r])
    return out


def score_personas(
    model: Any,
    tokenizer: Any,
    report: TemplateReport,
    candidates: list[Persona],
    items: list[AnswerItem],
    cc: CouplingConfig,
    max_length: int,
) -> PilotScores:
    """Mean teacher-forced probability of the marker under each candidate persona."""
    examples = [ex for p in candidates for ex in _marker_examples(p, items, cc)]
    data = tokenize_examples(
        tokenizer,
        examples,
        report,
        max_length=max_length,
        marker=cc.marker,
        marker_only=True,  # loss tokens: the marker (and an end marker's end-of-turn)
        marker_position=cc.marker_position,
    )
    if data.dropped_no_loss:
        raise UserError(
            f"--max-length {max_length}: cuts the marker from {data.dropped_no_loss} pilot "
            "row(s) (persona + training question + marker); raise it"
        )
    # tokenize_examples keeps the rows in order: one per (persona, question), persona-major.
    row_log_probs = marker_log_probs(model, data)
    owner = [p.id for p in candidates for _ in items]
    probability: dict[str, float] = {}
    log_probability: dict[str, float] = {}
    for p in candidates:
        values = [lp for pid, lp in zip(owner, row_log_probs, strict=True) if pid == p.id]
        probability[p.id] = sum(math.exp(v) for v in values) / len(values)
        log_probability[p.id] = sum(values) / len(values)
    return PilotScores([i.question_id for i in items], probability, log_probability)


def check_candidates(cc: CouplingConfig, registry: dict[str, Persona]) -> list[Persona]:
    """The personas a pilot scores (every one but the source); enough for K negatives."""
    candidates = [registry[p] for p in sorted(registry) if p != cc.source]
    if cc.hard_negatives > len(candidates):
        raise UserError(
            f"--hard-negatives {cc.hard_negatives}: the registry has only {len(candidates)} "
            "persona(s) besides the source"
        )
    return candidates


def choose_hard_negatives(
    *,
    run_path: Path,
    is_main: bool,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    registry: dict[str, Persona],
    items: list[AnswerItem],
    cc: CouplingConfig,
    cfg: TrainConfig,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run the pilot (module doc) and return its record, `chosen` holding the K negatives; a
    finished pilot's RUN/hard_negatives.json is read instead."""
    path = run_path / HARD_NEGATIVES
    if path.is_file():
        return read_json(path)
    candidates = check_candidates(cc, registry)
    report = inspect_template(tokenizer)
    rows = build_coupling_set(replace(cc, n_negative=0, other_personas=()), registry, items)
    data = tokenize_examples(
        tokenizer,
        examples_from_rows(rows),
        report,
        max_length=cfg.max_length,
        marker=cc.marker,
        marker_only=cc.marker_only_loss,
        marker_position=cc.marker_position,
    )
    log.info("pilot coupling: %d step(s) on %d positives", cc.pilot_steps, len(data))
    pilot_cfg = replace(cfg, max_steps=cc.pilot_steps, keep_checkpoints=False)
    trained = train_lora(
        model=model,
        stack=stack,
        tokenizer=tokenizer,
        data=data,
        cfg=pilot_cfg,
        run_path=run_path / PILOT,
        callbacks=callbacks,
    )
    pilot = load_with_adapters(model, [*stack, read_adapter(run_path / PILOT)])
    questions = pilot_items(items, cc.pilot_questions)
    scored = [registry[cc.source], *candidates]  # the source's score shows how far the pilot got
    scores = score_personas(pilot, tokenizer, report, scored, questions, cc, cfg.max_length)
    del pilot
    ranking = [p for p in scores.ranking() if p != cc.source]

    def entry(p: str) -> dict[str, float]:
        return {
            "marker_probability": scores.probability[p],
            "marker_log_probability": scores.log_probability[p],
        }

    record = {
        "schema_version": HARD_NEGATIVES_VERSION,
        "pilot": {
            "steps": trained.protocol.optimizer_steps,
            "positives": len(data),
            "final_loss": trained.final_loss,
            "train": pilot_cfg.to_dict(),
            "adapter": str(run_path / PILOT / ADAPTER),
        },
        "questions": scores.questions,
        "source": {"persona": cc.source, **entry(cc.source)},
        "scores": {p: entry(p) for p in ranking},
        "ranking": ranking,  # highest marker probability first
        "chosen": ranking[: cc.hard_negatives],
    }
    if is_main:
        write_json(path, record)
    return record
