"""What to generate and what comes back: the options every backend shares, and one completion.

`GenerationConfig` is the single place the sampling defaults live; commands build it from their
options and record `to_dict()` in config.json and the manifest. `Completion` is one sampled
answer. `row_seed`/`prompt_seed` derive per-prompt seeds from the run seed and the prompt text,
so a prompt's samples do not depend on which other prompts share its batch or on their order.

    from persona_cli.generate import GenerationConfig, generate_hf
    completions = generate_hf(model, tokenizer, prompts, GenerationConfig(n=4, max_new_tokens=64))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Called with the number of completions that just finished; the caller owns the progress bar.
ProgressFn = Callable[[int], None]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling options shared by the hf and vllm backends."""

    max_new_tokens: int = field(
        default=256, metadata={"help": "Most tokens generated per completion."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 keeps every token."}
    )
    n: int = field(default=1, metadata={"help": "Completions sampled per prompt."})
    seed: int = field(
        default=42, metadata={"help": "Run seed; per-prompt seeds are derived from it."}
    )
    batch_size: int = field(
        default=32,
        metadata={"help": "Sequences per forward pass (hf backend; vllm schedules its own)."},
    )

    def __post_init__(self) -> None:
        # Raised as ValueError: commands validate their options first and name the option.
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass(frozen=True)
class Completion:
    """One sampled answer to prompt `prompt_index` (its position in the input list)."""

    prompt_index: int
    sample_index: int
    text: str  # decoded without special tokens, untrimmed
    n_tokens: int  # tokens generated, counting the end-of-turn token when it stopped on one
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _digest(*parts: object) -> int:
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def row_seed(seed: int, prompt: str, sample_index: int) -> int:
    """Seed of the torch.Generator that draws sample `sample_index` of `prompt` (hf backend)."""
    return _digest("row", seed, sample_index, prompt) >> 1  # manual_seed wants < 2**63


def prompt_seed(seed: int, prompt: str) -> int:
    """Per-request seed for vLLM, which seeds the i-th of n samples with seed + i itself."""
    return _digest("prompt", seed, prompt) % (2**31 - 2**20)  # leaves room for + i
