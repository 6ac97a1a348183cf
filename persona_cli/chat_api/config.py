"""How to reach one chat model: `ClientConfig`, and the API-key lookup.

One config describes one (provider, endpoint, model) plus the sampling settings and the retry,
concurrency and failure-rate policy of a batch. The key itself is never stored here, only the
NAME of the environment variable that holds it, so a config can be written to `config.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from persona_cli.errors import UserError

PROVIDERS = ("openai", "anthropic")

# The variable each provider's own SDK reads; used when `api_key_env` is left as None.
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


@dataclass(frozen=True)
class ClientConfig:
    """One model endpoint and the policy for a batch of requests to it."""

    provider: str = field(
        metadata={
            "help": "'openai' (any /v1/chat/completions server: OpenAI, vllm serve) or "
            "'anthropic' (Messages API)."
        }
    )
    model: str = field(metadata={"help": "Model id sent in the request body."})
    base_url: str = field(
        metadata={
            "help": "As the provider's SDK spells it: 'https://api.openai.com/v1' or "
            "'http://localhost:8000/v1' for openai (we append /chat/completions), "
            "'https://api.anthropic.com' for anthropic (we append /v1/messages)."
        }
    )
    api_key_env: str | None = field(
        default=None,
        metadata={
            "help": "Name of the environment variable holding the key; None means the "
            "provider's usual one (OPENAI_API_KEY / ANTHROPIC_API_KEY). Localhost "
            "endpoints may run without it."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    max_tokens: int = field(default=512, metadata={"help": "Completion token limit."})
    logprobs: bool = field(
        default=False, metadata={"help": "Ask for per-token logprobs (openai provider only)."}
    )
    top_logprobs: int | None = field(
        default=None,
        metadata={
            "help": "How many alternatives per position (OpenAI allows up to 20; vllm up "
            "to its --max-logprobs). Needs logprobs=True."
        },
    )
    max_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    timeout_s: float = field(
        default=60.0, metadata={"help": "Wall-clock limit of one attempt, in seconds."}
    )
    max_retries: int = field(
        default=5,
        metadata={
            "help": "Retries after the first attempt on 429, 5xx, timeouts, dropped "
            "connections and malformed bodies. Other 4xx are never retried."
        },
    )
    backoff_base_s: float = field(
        default=1.0,
        metadata={"help": "Retry n waits uniform(0, min(backoff_max_s, base * 2**(n-1))) s."},
    )
    backoff_max_s: float = field(
        default=60.0,
        metadata={"help": "Cap on one backoff wait; a Retry-After header is honoured up to it."},
    )
    jitter_seed: int = field(
        default=0, metadata={"help": "Seed of the backoff jitter (per request, see client.py)."}
    )
    min_requests_for_abort: int = field(
        default=20,
        metadata={"help": "The failure-rate guard only judges after this many requests ended."},
    )
    max_failure_rate: float = field(
        default=0.20,
        metadata={"help": "Stop the batch once the failed share exceeds this (0..1)."},
    )
    prompt_price_per_1m: float | None = field(
        default=None, metadata={"help": "USD per 1M prompt tokens, for the cost estimate."}
    )
    completion_price_per_1m: float | None = field(
        default=None, metadata={"help": "USD per 1M completion tokens, for the cost estimate."}
    )
    anthropic_version: str = field(
        default="2023-06-01", metadata={"help": "anthropic-version header."}
    )

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise UserError(f"provider: {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if not self.model:
            raise UserError("model: must not be empty")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"base_url: {self.base_url!r} is not an http(s) URL")
        if self.max_tokens < 1:
            raise UserError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.top_logprobs is not None and not self.logprobs:
            raise UserError("top_logprobs: needs logprobs=True")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise UserError(f"top_logprobs: must be >= 0, got {self.top_logprobs}")
        if self.logprobs and self.provider == "anthropic":
            raise UserError("logprobs: the Anthropic Messages API returns no logprobs")
        if self.max_concurrency < 1:
            raise UserError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.timeout_s <= 0:
            raise UserError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise UserError(f"max_retries: must be >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise UserError("backoff_base_s/backoff_max_s: must be >= 0")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise UserError(f"max_failure_rate: must be in [0, 1], got {self.max_failure_rate}")
        if self.min_requests_for_abort < 1:
            raise UserError(
                f"min_requests_for_abort: must be >= 1, got {self.min_requests_for_abort}"
            )

    @property
    def key_env(self) -> str:
        """The environment variable the key is read from."""
        return self.api_key_env or DEFAULT_KEY_ENV[self.provider]

    @property
    def is_local(self) -> bool:
        """True for a server on this machine (e.g. `vllm serve`), which may need no key."""
        host = urlsplit(self.base_url).hostname or ""
        return host in _LOCAL_HOSTS or host.startswith("127.")


def resolve_api_key(config: ClientConfig) -> str | None:
    """The key from the environment, None for a local server without one.

    Raises UserError naming the variable (never a value) when a remote endpoint has no key.
    """
    key = os.environ.get(config.key_env, "").strip()
    if key:
        # Checked here so that httpx never gets to raise an encoding error quoting the header.
        if not (key.isascii() and key.isprintable()):
            raise UserError(f"{config.key_env} holds non-printable or non-ASCII characters")
        return key
    if config.is_local:
        return None
    raise UserError(
        f"{config.key_env} is not set: {config.provider} endpoint {config.base_url} needs an "
        f"API key (export {config.key_env}=..., or set api_key_env to another variable)"
    )
