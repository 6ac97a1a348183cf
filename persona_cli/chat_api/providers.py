"""The two wire formats: OpenAI-compatible chat completions and the Anthropic Messages API.

Each provider turns a `ChatRequest` into (url, headers, JSON payload) and a 2xx response body
into the normalised fields of a `ChatResult`. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from persona_cli.chat_api.config import ClientConfig
from persona_cli.chat_api.records import ChatRequest, request_key


class BadResponse(Exception):
    """A 2xx body that does not have the shape we need; `retryable` says whether to try again."""

    def __init__(self, kind: str, message: str, *, retryable: bool):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


@dataclass(frozen=True)
class Parsed:
    content: str | None
    finish_reason: str | None
    top_logprobs: list[list[dict[str, Any]]] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    response_model: str | None


def endpoint_url(config: ClientConfig) -> str:
    base = config.base_url.rstrip("/")
    if config.provider == "openai":
        return f"{base}/chat/completions"
    return f"{base}/v1/messages"


def build_headers(config: ClientConfig, api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if config.provider == "openai":
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
    else:
        headers["anthropic-version"] = config.anthropic_version
        if api_key:
            headers["x-api-key"] = api_key
    return headers


def build_payload(request: ChatRequest, config: ClientConfig) -> dict[str, Any]:
    """The JSON body. It holds no secret, so it is also what the cache key is computed from."""
    messages = [{"role": m["role"], "content": m["content"]} for m in request.messages]
    if config.provider == "openai":
        payload: dict[str, Any] = {
            "model": config.model,
            "messages": messages,
            "temperature": float(config.temperature),
            "max_tokens": config.max_tokens,
            "n": 1,
        }
        if config.logprobs:
            payload["logprobs"] = True
            if config.top_logprobs is not None:
                payload["top_logprobs"] = config.top_logprobs
        return payload
    # Anthropic takes the system prompt as a top-level field, not as a message.
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    payload = {
        "model": config.model,
        "messages": [m for m in messages if m["role"] != "system"],
        "temperature": float(config.temperature),
        "max_tokens": config.max_tokens,
    }
    if system:
        payload["system"] = system
    return payload


def parse_response(body: Any, config: ClientConfig) -> Parsed:
    """Normalise a 2xx JSON body; raises BadResponse when it lacks what we need."""
    if not isinstance(body, Mapping):
        raise BadResponse("malformed_response", "response JSON is not an object", retryable=True)
    try:
        if config.provider == "openai":
            return _parse_openai(body, config)
        return _parse_anthropic(body)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        # A 2xx with the wrong shape is usually a proxy or server hiccup: worth a retry.
        raise BadResponse(
            "malformed_response", f"response JSON lacks {exc!s:.80}", retryable=True
        ) from exc


def _parse_openai(body: Mapping[str, Any], config: ClientConfig) -> Parsed:
    choice = body["choices"][0]
    message = choice["message"]
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise TypeError("message.content is not a string")
    top: list[list[dict[str, Any]]] | None = None
    if config.logprobs:
        lp = choice.get("logprobs") or {}
        positions = lp.get("content")
        if positions is None:
            # The server ignored the request (e.g. a proxy that strips it): retrying won't help.
            raise BadResponse(
                "missing_logprobs",
                "logprobs were asked for but the response has none",
                retryable=False,
            )
        top = [
            [{"token": t["token"], "logprob": float(t["logprob"])} for t in pos["top_logprobs"]]
            for pos in positions
        ]
    usage = body.get("usage") or {}
    return Parsed(
        content=content,
        finish_reason=choice.get("finish_reason"),
        top_logprobs=top,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        response_model=body.get("model"),
    )


def _parse_anthropic(body: Mapping[str, Any]) -> Parsed:
    blocks = body["content"]
    if not isinstance(blocks, list):
        raise TypeError("content is not a list")
    # Only text blocks make the answer; thinking/tool blocks stay in `raw`.
    texts = [b["text"] for b in blocks if b.get("type") == "text"]
    usage = body.get("usage") or {}
    return Parsed(
        content="".join(texts) if texts else None,
        finish_reason=body.get("stop_reason"),
        top_logprobs=None,
        prompt_tokens=usage.get("input_tokens"),
        completion_tokens=usage.get("output_tokens"),
        response_model=body.get("model"),
    )


def cache_key(request: ChatRequest, config: ClientConfig) -> str:
    """The cache key `run_requests` uses for this request under this config."""
    return request_key(config, build_payload(request, config), request.sample)
