"""The chat-template guard on SmolLM2's template (injects a default) and on ones that do not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from persona_cli import models
from persona_cli.chat_template import (
    SystemPrompt,
    apply_system_prompt,
    guard_record,
    inspect_template,
    render,
)
from persona_cli.errors import UserError

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Qwen3-style ChatML: no system block unless the conversation has one.
PLAIN_CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3.1-style: a system block with a preamble is always written, even with no system message.
PREAMBLE = (
    "{{ '<s>[SYS]Knowledge cutoff: 2023\\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}"
    "{% endif %}{{ '[/SYS]' }}{% for m in rest %}{{ '[' + m['role'] + ']' + m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)
# Gemma-style: refuses a system role.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
)


@pytest.fixture(scope="module")
def smol_tok(prepared_home: Path):
    return models.load_tokenizer(models.resolve(models.EMBEDDED))


def _with_template(tok, template: str):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


Q = [{"role": "user", "content": "Hi?"}]


def test_smollm2_injects_its_default(smol_tok) -> None:
    rep = inspect_template(smol_tok)
    assert rep.supports_system_role and rep.injects_default_system_prompt
    assert rep.default_system_prompt == SMOL_DEFAULT
    none = render(smol_tok, Q, SystemPrompt.parse("none"), rep, add_generation_prompt=True)
    assert SMOL_DEFAULT not in none
    assert none == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    default = render(
        smol_tok, Q, SystemPrompt.parse("template-default"), rep, add_generation_prompt=True
    )
    assert default.startswith(f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>")
    text = render(
        smol_tok, Q, SystemPrompt.parse("You are a pirate."), rep, add_generation_prompt=False
    )
    assert (
        text == "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
    )


def test_plain_chatml_does_not_inject(smol_tok) -> None:
    tok = _with_template(smol_tok, PLAIN_CHATML)
    rep = inspect_template(tok)
    assert rep.supports_system_role and not rep.injects_default_system_prompt
    assert rep.default_system_prompt is None
    none = render(tok, Q, SystemPrompt.parse("none"), rep, add_generation_prompt=True)
    assert none == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"  # no empty block


def test_preamble_template_counts_as_injecting_an_empty_default(smol_tok) -> None:
    rep = inspect_template(_with_template(smol_tok, PREAMBLE))
    assert rep.injects_default_system_prompt and rep.default_system_prompt == ""
    assert rep.rendered_without_system.startswith("<s>[SYS]Knowledge cutoff")


def test_template_without_system_role(smol_tok) -> None:
    tok = _with_template(smol_tok, NO_SYSTEM)
    rep = inspect_template(tok)
    assert not rep.supports_system_role and not rep.injects_default_system_prompt
    with pytest.raises(UserError, match="no system role"):
        apply_system_prompt(Q, SystemPrompt.parse("You are X."), rep)
    assert (
        render(tok, Q, SystemPrompt.parse("none"), rep, add_generation_prompt=False) == "<user>Hi?"
    )


def test_data_with_its_own_system_message(smol_tok) -> None:
    rep = inspect_template(smol_tok)
    own = [{"role": "system", "content": "S"}, *Q]
    with pytest.raises(UserError, match="already has a system message"):
        apply_system_prompt(own, SystemPrompt.parse("none"), rep)
    assert apply_system_prompt(own, SystemPrompt.parse("template-default"), rep) == own


def test_guard_record_for_the_manifest(smol_tok) -> None:
    rec = guard_record(smol_tok, SystemPrompt.parse("none"))
    assert rec["injects_default_system_prompt"] is True
    assert rec["system_prompt"] == {"mode": "none", "text": None}
    assert rec["effective_system_prompt"] == ""
    assert rec["template"] == smol_tok.chat_template and len(rec["template_sha256"]) == 64
    assert SMOL_DEFAULT not in rec["rendered_example"]
    rec = guard_record(smol_tok, SystemPrompt.parse("template-default"))
    assert rec["effective_system_prompt"] == SMOL_DEFAULT
