"""The chat-template guard: render conversations with an explicit system-prompt choice.

Many chat templates add a system prompt of their own when a conversation has none (SmolLM2:
"You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5: "You are Qwen,
created by Alibaba Cloud..."). A run that believes it used "no system prompt" then silently
conditioned on the template's. Every command therefore takes `--system-prompt`:

- `TEXT`: this exact system message.
- `none`: no system prompt. Where the template would inject its default, an empty system turn is
  sent instead, which is the only way such a template renders without the default text.
- `template-default`: whatever the template does when no system message is given.

`inspect_template` finds out what a template does by rendering a probe conversation twice (with
a sentinel system message and without one) and comparing; the report, the exact template text
and a rendered example go into every manifest (`guard_record`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from persona_cli.artifacts import sha256_bytes
from persona_cli.errors import UserError

NONE = "none"
TEMPLATE_DEFAULT = "template-default"
_SENTINEL = "\u27e6persona-cli system sentinel\u27e7"
_PROBE_USER = "\u27e6persona-cli user probe\u27e7"


@dataclass(frozen=True)
class SystemPrompt:
    """What the user asked for with `--system-prompt` (mode 'text', 'none' or
    'template-default')."""

    mode: str
    text: str | None = None

    @classmethod
    def parse(cls, value: str | None) -> SystemPrompt:
        if value is None or value == NONE:
            return cls(NONE)
        if value == TEMPLATE_DEFAULT:
            return cls(TEMPLATE_DEFAULT)
        return cls("text", value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TemplateReport:
    template_sha256: str
    supports_system_role: bool
    injects_default_system_prompt: bool
    default_system_prompt: str | None  # the text it injects, when it injects one
    rendered_without_system: str  # the probe conversation as the model would see it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if not template:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; persona-cli needs an "
            "instruct model"
        )
    if isinstance(template, dict):  # named templates: the default one is what apply uses
        template = template.get("default") or next(iter(template.values()))
    return template


def inspect_template(tokenizer: Any) -> TemplateReport:
    """Detect whether the template injects a default system prompt.

    With a sentinel system message the render is `pre + SENTINEL + post`. If the render without
    a system message is `pre + X + post`, the template wrote its own system block around X: it
    injects a default (X may be empty when only a preamble such as Llama 3's date lines is
    added). If it is not of that form the template adds no system block.
    """
    template = template_text(tokenizer)
    user_only = [{"role": "user", "content": _PROBE_USER}]
    without = _render(tokenizer, user_only, True)
    try:
        with_sentinel = _render(
            tokenizer, [{"role": "system", "content": _SENTINEL}, *user_only], True
        )
    except Exception:  # jinja raises on templates that reject the system role (e.g. Gemma)
        with_sentinel = ""
    supports = _SENTINEL in with_sentinel
    injected: str | None = None
    if supports:
        pre, post = with_sentinel.split(_SENTINEL, 1)
        fits = len(without) >= len(pre) + len(post)
        if fits and without.startswith(pre) and without.endswith(post):
            injected = without[len(pre) : len(without) - len(post)]
    return TemplateReport(
        template_sha256=sha256_bytes(template.encode()),
        supports_system_role=supports,
        injects_default_system_prompt=injected is not None,
        default_system_prompt=injected,
        rendered_without_system=without,
    )


def apply_system_prompt(
    messages: list[dict[str, str]], system: SystemPrompt, report: TemplateReport
) -> list[dict[str, str]]:
    """The message list to render for `system`. A conversation that carries its own system
    message keeps it only under `template-default`; otherwise the clash is an error."""
    has_own = bool(messages) and messages[0]["role"] == "system"
    if has_own and system.mode != TEMPLATE_DEFAULT:
        raise UserError(
            "a conversation already has a system message; pass --system-prompt "
            "template-default to keep the data's own, or remove it from the data"
        )
    if system.mode == "text":
        if not report.supports_system_role:
            raise UserError("--system-prompt: this model's chat template has no system role")
        return [{"role": "system", "content": system.text or ""}, *messages]
    if system.mode == NONE and report.injects_default_system_prompt:
        return [{"role": "system", "content": ""}, *messages]
    return list(messages)


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    system: SystemPrompt,
    report: TemplateReport,
    *,
    add_generation_prompt: bool,
) -> str:
    return _render(tokenizer, apply_system_prompt(messages, system, report), add_generation_prompt)


def effective_system_prompt(system: SystemPrompt, report: TemplateReport) -> str | None:
    """The system text the model actually sees (None when it sees no system block)."""
    if system.mode == "text":
        return system.text
    if system.mode == NONE:
        return "" if report.injects_default_system_prompt else None
    return report.default_system_prompt


def guard_record(tokenizer: Any, system: SystemPrompt) -> dict[str, Any]:
    """The manifest's `chat_template` entry: template text and hash, whether it injects a
    default system prompt, the choice made, and a rendered example under that choice."""
    report = inspect_template(tokenizer)
    example = render(
        tokenizer,
        [{"role": "user", "content": "<question>"}],
        system,
        report,
        add_generation_prompt=True,
    )
    return {
        **report.to_dict(),
        "template": template_text(tokenizer),
        "system_prompt": system.to_dict(),
        "effective_system_prompt": effective_system_prompt(system, report),
        "rendered_example": example,
    }
