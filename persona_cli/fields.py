"""Config fields several commands share, declared once with their help text.

A command's config dataclass uses these instead of retyping the help of `model`, `adapters`,
`personas_file`, ... ; `persona_cli.config_tree` and the CLI read the help from the metadata.

    @dataclass(frozen=True)
    class MyConfig:
        model: str = fields.model()
        adapters: tuple[str, ...] = fields.adapters()
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any

from persona_cli.models import EMBEDDED


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING) -> Any:
    """A config field with its help text (a required one when no default is given)."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def model(default: str = EMBEDDED) -> Any:
    return option(
        default, "smollm2-135m (embedded), tiny-random, a local HF directory or a hub id."
    )


def adapters(help: str = "") -> Any:
    return option(
        (),
        help
        or "LoRA adapter (a PEFT dir or a training run dir); repeat to stack adapters in "
        "training order.",
    )


def personas_file() -> Any:
    return option(None, "Persona registry YAML (default: the shipped data/personas.yaml).")


def persona_ids(help: str = "Comma-separated persona ids (default: all in the registry).") -> Any:
    return option(None, help)


def questions_file(default_text: str) -> Any:
    return option(None, f"Question set YAML in the Betley et al. layout (default: {default_text}).")


def system_prompt(default: str = "none") -> Any:
    return option(
        default,
        "TEXT, 'none' (no system prompt; suppresses a template's injected default) or "
        "'template-default'.",
    )


def seed(default: int = 42, help: str = "Seed for every random choice and sampler.") -> Any:
    return option(default, help)


def allow_diff() -> Any:
    return option(
        (),
        "A protocol field allowed to differ (the declared manipulation; stage[i].FIELD for one "
        "stage); reported in the output. Repeatable.",
    )
