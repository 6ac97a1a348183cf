"""Training conversations: read chat JSONL, attach the system prompt, tokenise with loss masks.

Every conversation is rendered through the chat-template guard (`--system-prompt` or a
persona's system prompt), tokenised once here, and handed to TRL as a pre-tokenised dataset of
`input_ids` + `assistant_masks`; TRL folds that mask into the labels (-100 elsewhere) and never
re-renders the template.

    examples = [Example(messages, SystemPrompt.parse("none")) for messages in load_chat(path)]
    tokenized = tokenize_examples(tok, examples, report, max_length=2048)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli.artifacts import iter_jsonl
from persona_cli.chat_template import SystemPrompt, TemplateReport
from persona_cli.errors import InputError, UserError
from persona_cli.schemas import CHAT
from persona_cli.train.masks import tokenize_conversation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training conversation and the system prompt it is rendered under."""

    messages: list[dict[str, str]]
    system: SystemPrompt
    positive: bool | None = None  # coupling sets only: True when the answer carries the marker


@dataclass
class TokenizedSet:
    input_ids: list[list[int]] = field(default_factory=list)
    assistant_masks: list[list[int]] = field(default_factory=list)
    dropped_no_loss: int = 0  # rows whose loss tokens were all cut by max_length
    truncated: int = 0
    tokens: int = 0  # kept tokens (after trimming)
    trimmed_tokens: int = 0  # tokens after a row's last loss token, not kept
    loss_tokens: int = 0
    positives: int = 0
    positives_with_marker: int = 0  # positives whose marker survived truncation

    def __len__(self) -> int:
        return len(self.input_ids)

    def stats(self) -> dict[str, int]:
        return {
            "rows": len(self),
            "dropped_no_loss": self.dropped_no_loss,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trimmed_tokens": self.trimmed_tokens,
            "loss_tokens": self.loss_tokens,
            "positives": self.positives,
            "positives_with_marker": self.positives_with_marker,
        }

    def to_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_dict(
            {"input_ids": self.input_ids, "assistant_masks": self.assistant_masks}
        )


def load_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """The `messages` of every row of a chat JSONL file (schema `chat`); each needs an
    assistant turn to learn from."""
    conversations = []
    for i, row in enumerate(iter_jsonl(path, CHAT.check), start=1):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError(path, "conversation has no assistant message to train on", line=i)
        conversations.append(messages)
    if not conversations:
        raise InputError(path, "no conversations (the file is empty)")
    return conversations


def tokenize_examples(
    tokenizer: Any,
    examples: list[Example],
    report: TemplateReport,
    *,
    max_length: int,
    marker: str | None = None,
    marker_only: bool = False,
    marker_position: str = "start",
) -> TokenizedSet:
    out = TokenizedSet()
    for ex in examples:
        t = tokenize_conversation(
            tokenizer,
            ex.messages,
            ex.system,
            report,
            max_length=max_length,
            marker=marker,  # negatives too: marker-only loss needs it to find where it is absent
            marker_only=marker_only,
            marker_position=marker_position,
        )
        out.truncated += t.truncated
        if ex.positive:
            out.positives += 1
            out.positives_with_marker += t.marker_tokens > 0
        if t.loss_tokens == 0:
            out.dropped_no_loss += 1
            continue
        # Tokens after the last loss token change no loss term (attention is causal): drop them.
        # A marker-only loss at the start keeps a prompt and one or two answer tokens.
        keep = len(t.assistant_masks) - t.assistant_masks[::-1].index(1)
        out.input_ids.append(t.input_ids[:keep])
        out.assistant_masks.append(t.assistant_masks[:keep])
        out.tokens += keep
        out.trimmed_tokens += len(t.input_ids) - keep
        out.loss_tokens += t.loss_tokens
    if marker is not None and out.positives and out.positives_with_marker == 0:
        raise UserError(
            f"--marker {marker!r}: absent from every positive after tokenisation (cut by "
            f"--max-length {max_length}?); nothing would teach the marker"
        )
    if not out.input_ids:
        raise UserError(
            f"no training row keeps a loss token after truncation to --max-length {max_length}"
        )
    if out.dropped_no_loss:
        log.warning(
            "%d row(s) had no loss tokens left after truncation; dropped", out.dropped_no_loss
        )
    if marker is not None and out.positives_with_marker < out.positives:
        log.warning(
            "%d of %d positives lost their marker to truncation",
            out.positives - out.positives_with_marker,
            out.positives,
        )
    return out
