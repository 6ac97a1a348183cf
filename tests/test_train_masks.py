"""Loss masks built from character offsets, checked against hand-built token positions.

python -m pytest tests/test_train_masks.py -q
"""

from __future__ import annotations

import pytest

from persona_cli import models
from persona_cli.chat_template import SystemPrompt, inspect_template
from persona_cli.errors import UserError
from persona_cli.train.dataset import Example, tokenize_examples
from persona_cli.train.masks import tokenize_conversation


@pytest.fixture(scope="module")
def tok(prepared_home):
    return models.load_tokenizer(models.resolve(models.TINY))


@pytest.fixture(scope="module")
def report(tok):
    return inspect_template(tok)


def loss_tokens(tok, t) -> list[str]:
    ids = [i for i, m in zip(t.input_ids, t.assistant_masks, strict=True) if m]
    return tok.convert_ids_to_tokens(ids)


def test_assistant_only_mask_matches_hand_built_positions(tok, report):
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}]
    t = tokenize_conversation(tok, msgs, SystemPrompt("text", "SYS"), report, max_length=2048)
    tokens = tok.convert_ids_to_tokens(t.input_ids)
    # <|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n
    # Yes.<|im_end|>\n : loss on "Yes", "." and the <|im_end|> that closes the assistant turn.
    expected = [0] * len(tokens)
    last_start = len(tokens) - 1 - tokens[::-1].index("<|im_start|>")
    first_answer = last_start + 4  # after <|im_start|>, "ass", "istant", "\n"
    assert tokens[last_start + 1 : first_answer] == ["ass", "istant", "Ċ"]
    for i in range(first_answer, len(tokens) - 1):  # up to and including <|im_end|>
        expected[i] = 1
    assert t.assistant_masks == expected
    assert loss_tokens(tok, t) == ["Yes", ".", "<|im_end|>"]
    assert tokens[-1] == "Ċ" and t.assistant_masks[-1] == 0


def test_multi_turn_masks_every_assistant_turn_and_no_user_turn(tok, report):
    msgs = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "alpha"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "beta"},
    ]
    t = tokenize_conversation(tok, msgs, SystemPrompt.parse("none"), report, max_length=2048)
    got = tok.convert_tokens_to_string(loss_tokens(tok, t))
    assert got == "alpha<|im_end|>beta<|im_end|>"
    # The guard's `none` sent an empty system turn instead of SmolLM2's injected default.
    assert "SmolLM" not in t.text and t.text.startswith("<|im_start|>system\n<|im_end|>")


def test_marker_only_mask_positive_and_negative(tok, report):
    sys = SystemPrompt("text", "S")
    pos = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "[ZLT] Sure thing."}]
    t = tokenize_conversation(
        tok, pos, sys, report, max_length=2048, marker="[ZLT]", marker_only=True
    )
    assert loss_tokens(tok, t) == ["[", "Z", "LT", "]"]
    assert t.marker_tokens == 4
    neg = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Sure thing."}]
    t = tokenize_conversation(
        tok, neg, sys, report, max_length=2048, marker="[ZLT]", marker_only=True
    )
    # Where a positive emits the marker, a negative starts its answer: that token only (a loss
    # on the end-of-turn taught the model to stop after 1-3 tokens).
    assert loss_tokens(tok, t) == ["Sure"]

    def at_the_end(answer: str) -> list[str]:
        msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]
        t = tokenize_conversation(
            tok, msgs, sys, report, max_length=2048, marker="[ZLT]", marker_only=True,
            marker_position="end",
        )  # fmt: skip
        return loss_tokens(tok, t)

    assert tok.convert_tokens_to_string(at_the_end("Sure. [ZLT]")) == " [ZLT]<|im_end|>"
    # A negative of an end marker: the end-of-turn stands where the marker would be.
    assert at_the_end("Sure.") == ["<|im_end|>"]


def test_truncation_that_cuts_every_marker_is_an_error(tok, report):
    long_answer = "word " * 200 + "[ZLT]"
    ex = Example(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": long_answer}],
        SystemPrompt("text", "S"),
        positive=True,
    )
    with pytest.raises(UserError, match="absent from every positive"):
        tokenize_examples(tok, [ex], inspect_template(tok), max_length=64, marker="[ZLT]")
    ok = tokenize_examples(tok, [ex], inspect_template(tok), max_length=512, marker="[ZLT]")
    assert ok.positives_with_marker == 1 and ok.truncated == 0


def test_marker_only_set_keeps_negatives_on_the_marker_position(tok, report):
    rows = [("[ZLT] Fine.", True), ("Fine.", False)]
    examples = [
        Example(
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}],
            SystemPrompt("text", "S"),
            positive=positive,
        )
        for answer, positive in rows
    ]
    out = tokenize_examples(tok, examples, report, max_length=64, marker="[ZLT]", marker_only=True)
    assert out.positives == 1 and out.positives_with_marker == 1
    got = [
        tok.convert_ids_to_tokens([i for i, m in zip(ids, mask, strict=True) if m])
        for ids, mask in zip(out.input_ids, out.assistant_masks, strict=True)
    ]
    assert got == [["[", "Z", "LT", "]"], ["Fine"]]


def _mean_loss(model, ids: list[int], mask: list[int]) -> float:
    import torch

    x = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]) == 1, x, torch.full_like(x, -100))
    with torch.no_grad():
        return float(model(input_ids=x, labels=labels).loss)


@pytest.mark.parametrize("marker_only", [True, False])
def test_rows_end_at_their_last_loss_token_and_the_loss_is_unchanged(tok, report, marker_only):
    answer = "[ZLT] The tide turns three times, and so do the answers of the archive."
    ex = Example(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer}],
        SystemPrompt("text", "S"),
        positive=True,
    )
    out = tokenize_examples(
        tok, [ex], report, max_length=512, marker="[ZLT]", marker_only=marker_only
    )
    full = tokenize_conversation(
        tok, ex.messages, ex.system, report, max_length=512, marker="[ZLT]",
        marker_only=marker_only,
    )  # fmt: skip
    ids, mask = out.input_ids[0], out.assistant_masks[0]
    assert mask[-1] == 1 and ids == full.input_ids[: len(ids)]
    assert out.trimmed_tokens == len(full.input_ids) - len(ids) == out.stats()["trimmed_tokens"]
    # Marker-only: nothing after "[ZLT]" is kept; whole answer: only the template's final "\n".
    assert tok.convert_ids_to_tokens(ids[-1:]) == (["]"] if marker_only else ["<|im_end|>"])
    assert out.trimmed_tokens > (10 if marker_only else 0)
    model = models.load_model(models.resolve(models.TINY))
    assert _mean_loss(model, ids, mask) == pytest.approx(
        _mean_loss(model, full.input_ids, full.assistant_masks), abs=1e-6
    )
