"""Multiple-choice capability: accuracy from the log-likelihood of each answer letter.

ARC-Challenge style. Each item is shown as a user turn (question, lettered options, "Answer with
the letter only."); after the assistant header the model's next-token log-probabilities of the
option letters are compared and the highest is its answer. No sampling, so the score is
deterministic for given weights. Items come from a local JSONL in the `allenai/ai2_arc` fields
(`id`, `question`, `choices: {text, label}`, `answerKey`; `data/mcq/mini_arc.jsonl` ships) or,
on a pod with network, from the hub as `hf:allenai/ai2_arc:ARC-Challenge:test`.

    persona-cli eval-capability --model smollm2-135m --out runs/cap_base
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl, sha256_json
from persona_cli.chat_template import SystemPrompt, TemplateReport, render
from persona_cli.errors import InputError, UserError
from persona_cli.protocol import RunProtocol, details, method_protocol

SCHEMA_VERSION = 1
INSTRUCTION = "Answer with the letter of the correct option only."


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    answer: str


def _check_item(row: dict[str, Any]) -> list[str]:
    for key in ("id", "question", "choices", "answerKey"):
        if key not in row:
            return [f"missing field '{key}'"]
    choices = row["choices"]
    if (
        not isinstance(choices, dict)
        or not isinstance(choices.get("text"), list)
        or not isinstance(choices.get("label"), list)
    ):
        return ['\'choices\' must be {"text": [...], "label": [...]}']
    if len(choices["text"]) != len(choices["label"]) or len(choices["label"]) < 2:
        return ["'choices' needs at least two options with as many labels as texts"]
    if row["answerKey"] not in choices["label"]:
        return [f"answerKey {row['answerKey']!r} is not one of the labels {choices['label']}"]
    return []


def _item(row: dict[str, Any]) -> MCItem:
    return MCItem(
        id=str(row["id"]),
        question=row["question"],
        texts=tuple(row["choices"]["text"]),
        labels=tuple(str(lab) for lab in row["choices"]["label"]),
        answer=str(row["answerKey"]),
    )


SCORER = "letter-logprob"  # the option letter with the highest log-prob after the prompt


def protocol(items: list[MCItem]) -> RunProtocol:
    """The guarded fields of an eval-capability run: the items scored (their content, so a
    --limit or another file differs), the scorer and its instruction."""
    return method_protocol(
        backend="hf",
        item_set_sha256=sha256_json([asdict(i) for i in items]),
        capability_scorer=SCORER,
    ) | details(instruction=INSTRUCTION, n_items=len(items))


def load_items(source: str, limit: int | None = None) -> list[MCItem]:
    """Items from a JSONL path or `hf:NAME:CONFIG:SPLIT` (needs network and `datasets`)."""
    if source.startswith("hf:"):
        parts = source.split(":")
        if len(parts) != 4:
            raise UserError(f"--items {source!r}: expected hf:NAME:CONFIG:SPLIT")
        from datasets import load_dataset

        rows = list(load_dataset(parts[1], parts[2], split=parts[3]))
        bad = next(((i, p) for i, r in enumerate(rows) if (p := _check_item(r))), None)
        if bad is not None:
            raise InputError(source, bad[1][0], line=bad[0] + 1)
    else:
        rows = list(iter_jsonl(Path(source), _check_item))
    items = [_item(r) for r in rows][:limit]
    if not items:
        raise InputError(source, "no multiple-choice items")
    return items


def prompt_text(item: MCItem) -> str:
    options = "\n".join(f"{lab}. {text}" for lab, text in zip(item.labels, item.texts, strict=True))
    return f"{item.question}\n\n{options}\n\n{INSTRUCTION}"


def label_token_ids(tokenizer: Any, labels: tuple[str, ...]) -> list[int]:
    """The single token each label is at the start of the assistant turn."""
    ids = []
    for lab in labels:
        toks = tokenizer.encode(lab, add_special_tokens=False)
        if len(toks) != 1:
            raise UserError(
                f"option label {lab!r} is {len(toks)} tokens for this tokenizer; "
                "letter scoring needs single-token labels"
            )
        ids.append(toks[0])
    return ids


def score_items(
    model: Any,
    tokenizer: Any,
    items: list[MCItem],
    system: SystemPrompt,
    report: TemplateReport,
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per item: the log-probability of every option letter, the prediction, and
    whether it is correct. Batches are left-padded so the last position is each prompt's end."""
    import torch

    prompts = [
        render(
            tokenizer,
            [{"role": "user", "content": prompt_text(it)}],
            system,
            report,
            add_generation_prompt=True,
        )
        for it in items
    ]
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    rows: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            enc = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            with torch.no_grad():
                logits = model(**enc).logits[:, -1, :].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for i, it in enumerate(chunk):
                ids = label_token_ids(tokenizer, it.labels)
                lp = {lab: float(logprobs[i, t]) for lab, t in zip(it.labels, ids, strict=True)}
                predicted = max(lp, key=lp.__getitem__)
                rows.append(
                    {
                        "schema_version": SCHEMA_VERSION,
                        "id": it.id,
                        "question": it.question,
                        "labels": list(it.labels),
                        "label_logprobs": lp,
                        "predicted": predicted,
                        "answer": it.answer,
                        "correct": predicted == it.answer,
                        "n_prompt_tokens": int(enc["attention_mask"][i].sum()),
                    }
                )
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = pad_side
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with a Wilson interval; recomputable from the saved rows alone."""
    from persona_cli.stats import proportion_interval

    hits = sum(r["correct"] for r in rows)
    chance = sum(1 / len(r["labels"]) for r in rows) / len(rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "accuracy": proportion_interval(hits, len(rows)).to_dict(),
        "n_items": len(rows),
        "chance_accuracy": chance,
    }
