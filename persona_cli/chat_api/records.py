"""What goes in and what comes out: `ChatRequest`, `ChatResult`, the cache key, usage totals.

`ChatResult.to_dict()` is the row a command writes to its JSONL artifact; `from_dict` reads a row
(or a cache entry) back. Both carry `schema_version`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from persona_cli.chat_api.config import ClientConfig
from persona_cli.errors import UserError
from persona_cli.schemas import CHAT_RESULT

SCHEMA_VERSION = CHAT_RESULT.version
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to obtain.

    `sample` tells apart repeated draws of the same prompt (K samples at temperature 1): it is
    part of the cache key but not sent, so without it K identical prompts would get one cached
    answer.
    """

    id: str  # the caller's name for it, e.g. "persona=pirate/q=12/s=3"; unique within a batch
    messages: Sequence[Mapping[str, str]]  # [{"role": "system"|"user"|"assistant", "content"}]
    sample: int = 0

    def validate(self) -> None:
        if not self.messages:
            raise UserError(f"request {self.id}: no messages")
        for i, m in enumerate(self.messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"request {self.id}: message {i} needs role in {ROLES} and string content"
                )


@dataclass(frozen=True)
class ChatResult:
    """The normalised outcome of one request; `status` is "ok" or "failed" (with `reason`)."""

    key: str  # sha256 cache key, see request_key()
    id: str
    provider: str
    model: str  # the model asked for; `response_model` is what the server says it ran
    status: str
    reason: str | None = None  # one line when failed: "HTTP 400: <body excerpt>", "timeout ..."
    error_kind: str | None = None  # short class of `reason`: http_400, timeout, connection, ...
    attempts: int = 0
    http_status: int | None = None  # of the last attempt
    content: str | None = None
    finish_reason: str | None = None
    # Per generated position, the top-k alternatives [{"token", "logprob"}], when asked for;
    # a judge reading one score token uses top_logprobs[0].
    top_logprobs: list[list[dict[str, Any]]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None  # of the last attempt
    response_model: str | None = None
    raw: Any = field(default=None, repr=False)  # the response JSON as received (minus secrets)
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "key": self.key,
            "id": self.id,
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "reason": self.reason,
            "error_kind": self.error_kind,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "content": self.content,
            "finish_reason": self.finish_reason,
            "top_logprobs": self.top_logprobs,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": self.latency_s,
            "response_model": self.response_model,
            "raw": self.raw,
            "from_cache": self.from_cache,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatResult:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version {d.get('schema_version')!r} != {SCHEMA_VERSION}")
        # Exact key set: a row from another schema is an error, not silently half-read.
        return cls(**{k: v for k, v in d.items() if k != "schema_version"})


def canonical_json(obj: Any) -> bytes:
    """Sorted-key compact JSON: equal payloads give equal bytes, so equal cache keys."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def request_key(config: ClientConfig, payload: Mapping[str, Any], sample: int) -> str:
    """sha256 of (provider, base_url, model, payload, sample); headers (the key) are not in it."""
    material = {
        "provider": config.provider,
        "base_url": config.base_url.rstrip("/"),
        "model": config.model,
        "payload": payload,
        "sample": sample,
    }
    return hashlib.sha256(canonical_json(material)).hexdigest()


@dataclass(frozen=True)
class ModelUsage:
    """Token totals of the successful results of one model, and their cost when priced."""

    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": self.cost_usd,
        }


def usage_by_model(
    results: Iterable[ChatResult],
    configs: Iterable[ClientConfig] = (),
    *,
    include_cached: bool = True,
) -> dict[str, ModelUsage]:
    """Sum tokens of ok results per requested model; cost where a config prices that model.

    `include_cached=False` counts only what this run paid for (cache hits cost nothing now).
    """
    prices = {
        c.model: (c.prompt_price_per_1m, c.completion_price_per_1m)
        for c in configs
        if c.prompt_price_per_1m is not None or c.completion_price_per_1m is not None
    }
    sums: dict[str, list[int]] = {}
    for r in results:
        if not r.ok or (r.from_cache and not include_cached):
            continue
        s = sums.setdefault(r.model, [0, 0, 0])
        s[0] += 1
        s[1] += r.prompt_tokens or 0
        s[2] += r.completion_tokens or 0
    out = {}
    for model, (n, p, c) in sorted(sums.items()):
        cost = None
        if model in prices:
            pin, pout = prices[model]
            cost = (p * (pin or 0.0) + c * (pout or 0.0)) / 1e6
        out[model] = ModelUsage(model, n, p, c, cost)
    return out
