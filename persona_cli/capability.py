"""Multiple-choice capability: accuracy from the log-likelihood of each answer letter.

Each item is shown as a user turn (question, lettered options, "Answer with the letter only.");
after the assistant header the model's next-token log-probabilities of the option letters are
compared and the highest is its answer. No sampling, so the score is deterministic for given
weights. Two item layouts, detected per file from the first row's `choices`:

- ARC (`allenai/ai2_arc`): `id`, `question`, `choices: {text, label}`, `answerKey`, optional
  `subject`; `data/mcq/mini_arc.jsonl` ships.
- MMLU (`cais/mmlu`): `question`, `subject`, `choices: [..]`, `answer: int` (the gold option's
  index; labels are A, B, C, ...), optional `id` (else `SUBJECT/ROW`, the 1-based row number);
  `data/mcq/mini_mmlu.jsonl` ships (including the four-class `moral_scenarios`).

Items come from a local JSONL or, with network, `hf:NAME:CONFIG:SPLIT`. The summary reads
accuracy per subject and per gold answer class (Wilson intervals) with macro and micro averages;
`summarize` rebuilds it from the saved rows alone.

    persona-cli eval-capability --model smollm2-135m --out runs/cap_base
    persona-cli eval-capability --items data/mcq/mini_mmlu.jsonl --subjects moral_scenarios \
        --persona villain --out runs/cap_villain
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli.artifacts import iter_jsonl, sha256_json
from persona_cli.chat_template import SystemPrompt, TemplateReport, render
from persona_cli.errors import InputError, UserError
from persona_cli.protocol import RunProtocol, details, method_protocol
from persona_cli.schemas import CAPABILITY_ROWS, CAPABILITY_SUMMARY

ROW_SCHEMA_VERSION = CAPABILITY_ROWS.version
SUMMARY_SCHEMA_VERSION = CAPABILITY_SUMMARY.version
INSTRUCTION = "Answer with the letter of the correct option only."
ARC, MMLU = "arc", "mmlu"


def mmlu_file() -> Path:
    """The MMLU-layout items written for this project (tests and the demo)."""
    return bundled.data_dir() / "mcq" / "mini_mmlu.jsonl"


@dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    answer: str
    subject: str | None = None

    @property
    def gold_index(self) -> int:
        return self.labels.index(self.answer)

    def content(self) -> dict[str, Any]:
        """What `item_set_sha256` hashes; an item without a subject hashes as before."""
        out: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "texts": list(self.texts),
            "labels": list(self.labels),
            "answer": self.answer,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        return out


def layout_of(row: dict[str, Any]) -> str:
    """ARC when `choices` is a mapping, MMLU when it is a list."""
    return MMLU if isinstance(row.get("choices"), list) else ARC


def _check_subject(row: dict[str, Any], required: bool) -> list[str]:
    if "subject" not in row and not required:
        return []
    subject = row.get("subject")
    if not isinstance(subject, str) or not subject:
        return ["'subject' must be a non-empty string"]
    return []


def _check_arc(row: dict[str, Any]) -> list[str]:
    for key in ("id", "question", "choices", "answerKey"):
        if key not in row:
            what = "no gold answer (field 'answerKey')" if key == "answerKey" else ""
            return [what or f"missing field '{key}'"]
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
    return _check_subject(row, required=False)


def _check_mmlu(row: dict[str, Any]) -> list[str]:
    for key in ("question", "subject", "choices"):
        if key not in row:
            return [f"missing field '{key}'"]
    if "answer" not in row:
        return ["no gold answer (field 'answer')"]
    choices, answer = row["choices"], row["answer"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
        return ["'choices' must be a list of 2 to 26 options"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        return [f"'answer' must be the gold option's index (an integer), not {answer!r}"]
    if not 0 <= answer < len(choices):
        return [f"answer index {answer} is out of range for {len(choices)} choices"]
    return _check_subject(row, required=True)


def row_problems(row: dict[str, Any]) -> list[str]:
    """The problems of one row in its own layout (empty when it is a valid item)."""
    return _check_mmlu(row) if layout_of(row) == MMLU else _check_arc(row)


def _row_checker() -> Callable[[dict[str, Any]], list[str]]:
    """A row check that fixes the file's layout from its first row."""
    seen: list[str] = []

    def check(row: dict[str, Any]) -> list[str]:
        layout = layout_of(row)
        if not seen:
            seen.append(layout)
        if layout != seen[0]:
            return [f"a {layout.upper()}-layout row in a {seen[0].upper()}-layout file"]
        return row_problems(row)

    return check


def item_from_row(row: dict[str, Any], line: int) -> MCItem:
    """The item of a valid row; an MMLU row without `id` is `SUBJECT/LINE` (1-based)."""
    if layout_of(row) == MMLU:
        labels = tuple(string.ascii_uppercase[: len(row["choices"])])
        return MCItem(
            id=str(row["id"]) if "id" in row else f"{row['subject']}/{line}",
            question=row["question"],
            texts=tuple(str(c) for c in row["choices"]),
            labels=labels,
            answer=labels[row["answer"]],
            subject=row["subject"],
        )
    return MCItem(
        id=str(row["id"]),
        question=row["question"],
        texts=tuple(row["choices"]["text"]),
        labels=tuple(str(lab) for lab in row["choices"]["label"]),
        answer=str(row["answerKey"]),
        subject=row.get("subject"),
    )


SCORER = "letter-logprob"  # the option letter with the highest log-prob after the prompt
# How prompt_text lays an item out; with INSTRUCTION, what the hf backend's prompt hash covers.
PROMPT_FORMAT = "{question}\n\n{label}. {text} (one line per option)\n\n{instruction}"


def prompt_sha256() -> str:
    """The hf backend's `capability_prompt_sha256`: its prompt layout and instruction."""
    return sha256_json({"format": PROMPT_FORMAT, "instruction": INSTRUCTION})


def protocol(
    items: list[MCItem],
    persona: str | None = None,
    *,
    backend: str = "hf",
    scorer: str = SCORER,
    prompt_hash: str | None = None,
    instruction: str | None = INSTRUCTION,
    **recorded: Any,
) -> RunProtocol:
    """The guarded fields of an eval-capability run: the backend, the items scored (their
    content, so a --limit, --subjects or another file differs), the scorer and the prompt format
    (`prompt_hash`; default: the hf backend's `prompt_sha256()`, the lm-eval backend passes its
    tasks' config hash: prompt template, few-shot, metrics); the instruction and `recorded` are
    details. The system prompt (from --persona or --system-prompt) is guarded through the
    chat-template record."""
    return method_protocol(
        backend=backend,
        item_set_sha256=sha256_json([i.content() for i in items]),
        capability_scorer=scorer,
        capability_prompt_sha256=prompt_hash or prompt_sha256(),
    ) | details(instruction=instruction, n_items=len(items), persona=persona, **recorded)


def _hf_rows(source: str) -> list[dict[str, Any]]:
    parts = source.split(":")
    if len(parts) != 4:
        raise UserError(f"--items {source!r}: expected hf:NAME:CONFIG:SPLIT")
    from datasets import load_dataset

    rows = [dict(r) for r in load_dataset(parts[1], parts[2], split=parts[3])]
    check = _row_checker()
    bad = next(((i, p) for i, r in enumerate(rows) if (p := check(r))), None)
    if bad is not None:
        raise InputError(source, bad[1][0], line=bad[0] + 1)
    return rows


def load_items(
    source: str, limit: int | None = None, subjects: list[str] | None = None
) -> list[MCItem]:
    """Items from a JSONL path or `hf:NAME:CONFIG:SPLIT` (needs network and `datasets`), keeping
    only `subjects` when given (an unknown one is an error naming it), then the first `limit`."""
    rows = (
        _hf_rows(source)
        if source.startswith("hf:")
        else list(iter_jsonl(Path(source), _row_checker()))
    )
    items = [item_from_row(r, line) for line, r in enumerate(rows, start=1)]
    if subjects:
        present = {i.subject for i in items}
        for subject in subjects:
            if subject not in present:
                known = ", ".join(sorted(s for s in present if s is not None)) or "none"
                raise UserError(
                    f"--subjects {subject!r}: no item of {source} has it (subjects: {known})"
                )
        items = [i for i in items if i.subject in subjects]
    items = items[:limit]
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
                        "schema_version": ROW_SCHEMA_VERSION,
                        "id": it.id,
                        "question": it.question,
                        "labels": list(it.labels),
                        "label_logprobs": lp,
                        "predicted": predicted,
                        "answer": it.answer,
                        "gold_index": it.gold_index,
                        "subject": it.subject,
                        "correct": predicted == it.answer,
                        "n_prompt_tokens": int(enc["attention_mask"][i].sum()),
                    }
                )
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = pad_side
    return rows


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from persona_cli.stats import proportion_interval

    return proportion_interval(sum(r["correct"] for r in rows), len(rows)).to_dict()


def _grouped(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[key]), []).append(r)
    return {g: {"accuracy": _accuracy(rs), "n": len(rs)} for g, rs in sorted(groups.items())}


def _macro(groups: dict[str, dict[str, Any]]) -> float | None:
    rates = [g["accuracy"]["rate"] for g in groups.values()]
    return sum(rates) / len(rates) if rates else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with a Wilson interval, overall (micro) and per subject and per gold class
    (`per_class` keyed by the gold label; within each subject too), with the macro average of
    each grouping; recomputable from the saved rows alone. Rows without a subject (ARC) are in
    no subject group."""
    with_subject = [r for r in rows if r["subject"] is not None]
    per_subject = _grouped(with_subject, "subject")
    for subject, entry in per_subject.items():
        entry["per_class"] = _grouped(
            [r for r in with_subject if r["subject"] == subject], "answer"
        )
    per_class = _grouped(rows, "answer")
    chance = sum(1 / len(r["labels"]) for r in rows) / len(rows)
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "accuracy": _accuracy(rows),
        "n_items": len(rows),
        "chance_accuracy": chance,
        "per_subject": per_subject,
        "per_class": per_class,
        "macro_accuracy": {"subjects": _macro(per_subject), "classes": _macro(per_class)},
        "micro_accuracy": _accuracy(rows)["rate"],
    }
