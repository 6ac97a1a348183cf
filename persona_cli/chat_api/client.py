"""The async batch runner: concurrency, retries with backoff, cache, failure-rate guard.

`run_requests` (sync) and `run_requests_async` take a batch of `ChatRequest`s for one
`ClientConfig` and return one `ChatResult` per request, in order. A single request never
raises: it ends "ok" or "failed" with a reason. The batch raises only for user errors (missing
key, unreadable cache, duplicate ids) and `FailureRateExceeded`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import orjson

from persona_cli.chat_api.cache import ResultCache
from persona_cli.chat_api.config import ClientConfig, resolve_api_key
from persona_cli.chat_api.providers import (
    BadResponse,
    Parsed,
    build_headers,
    build_payload,
    endpoint_url,
    parse_response,
)
from persona_cli.chat_api.records import ChatRequest, ChatResult, request_key
from persona_cli.errors import UserError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Sleep = Callable[[float], Awaitable[None]]

_EXCERPT_CHARS = 200
_REDACTED = "[REDACTED]"


class FailureRateExceeded(UserError):
    """The batch stopped because too many requests failed; `results` holds what was obtained
    (successes are also in the cache; requests never sent are "failed" with kind "aborted")."""

    def __init__(self, message: str, results: list[ChatResult]):
        super().__init__(message)
        self.results = results


@dataclass
class _Attempt:
    """What one HTTP attempt gave."""

    latency_s: float
    http_status: int | None = None
    parsed: Parsed | None = None
    raw: Any = None
    kind: str | None = None  # None when ok
    reason: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms (OpenAI), Retry-After secs or date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Batch:
    """State shared by the request tasks of one batch; all of it lives on the event loop thread,
    so the counters need no lock."""

    def __init__(
        self,
        config: ClientConfig,
        api_key: str | None,
        cache: ResultCache,
        client: httpx.AsyncClient,
        sleep: Sleep,
    ):
        self.config = config
        self.secret = api_key
        self.cache = cache
        self.client = client
        self.sleep = sleep
        self.url = endpoint_url(config)
        self.headers = build_headers(config, api_key)
        self.semaphore = asyncio.Semaphore(config.max_concurrency)
        self.completed = 0  # requests sent in this run that ended (cache hits do not count)
        self.failed = 0
        self.failures: Counter[str] = Counter()
        self.example_reason: dict[str, str] = {}
        self.aborted = False

    def redact(self, text: str) -> str:
        # A proxy or a server error page may echo our headers back; never keep the key.
        return text.replace(self.secret, _REDACTED) if self.secret else text

    def redact_json(self, obj: Any) -> Any:
        if not self.secret:
            return obj
        data = orjson.dumps(obj)
        secret = orjson.dumps(self.secret)[1:-1]  # as it appears inside a JSON string
        if secret not in data:
            return obj
        return orjson.loads(data.replace(secret, _REDACTED.encode()))

    def excerpt(self, text: str) -> str:
        return self.redact(" ".join(text.split()))[:_EXCERPT_CHARS]

    async def attempt(self, body: bytes) -> _Attempt:
        t0 = time.monotonic()
        try:
            # httpx's timeout is per phase (a slow trickle resets it); wait_for bounds the total.
            response = await asyncio.wait_for(
                self.client.post(self.url, content=body, headers=self.headers),
                self.config.timeout_s,
            )
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return _Attempt(
                latency_s=time.monotonic() - t0,
                kind="timeout",
                reason=f"timeout: no complete reply within {self.config.timeout_s:g} s",
                retryable=True,
            )
        except httpx.HTTPError as exc:  # refused, reset, closed without a reply, bad framing
            return _Attempt(
                latency_s=time.monotonic() - t0,
                kind="connection",
                reason=f"connection: {type(exc).__name__}: {self.excerpt(str(exc))}",
                retryable=True,
            )
        latency = time.monotonic() - t0
        status = response.status_code
        if not 200 <= status < 300:
            retryable = status == 429 or status >= 500
            return _Attempt(
                latency_s=latency,
                http_status=status,
                kind=f"http_{status}",
                reason=f"HTTP {status}: {self.excerpt(response.text)}",
                retryable=retryable,
                retry_after_s=_retry_after_s(response.headers) if retryable else None,
            )
        try:
            raw = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return _Attempt(
                latency_s=latency,
                http_status=status,
                kind="malformed_json",
                reason=f"malformed JSON body: {self.excerpt(response.text)}",
                retryable=True,
            )
        try:
            parsed = parse_response(raw, self.config)
        except BadResponse as exc:
            return _Attempt(
                latency_s=latency,
                http_status=status,
                kind=exc.kind,
                reason=f"{exc.kind}: {self.redact(str(exc))}",
                retryable=exc.retryable,
            )
        return _Attempt(latency_s=latency, http_status=status, parsed=parsed, raw=raw)

    def backoff_s(self, attempt: int, rng: random.Random, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.config.backoff_max_s)
        # Full jitter (AWS architecture blog): uniform over [0, capped exponential].
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return rng.uniform(0.0, cap)

    async def run_one(self, key: str, payload: Mapping[str, Any], req_id: str) -> ChatResult:
        body = orjson.dumps(payload)
        # One generator per request, seeded by the key: the jitter a request gets does not
        # depend on how the event loop interleaved the others.
        rng = random.Random(f"{self.config.jitter_seed}:{key}")
        attempts = 0
        last: _Attempt | None = None
        while True:
            async with self.semaphore:
                if self.aborted:
                    break
                attempts += 1
                last = await self.attempt(body)
            if last.kind is None or not last.retryable or attempts > self.config.max_retries:
                break
            delay = self.backoff_s(attempts, rng, last.retry_after_s)
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                req_id,
                attempts,
                self.config.max_retries + 1,
                last.reason,
                delay,
            )
            await self.sleep(delay)
        result = self.make_result(key, req_id, attempts, last)
        self.account(result, payload)
        return result

    def make_result(
        self, key: str, req_id: str, attempts: int, last: _Attempt | None
    ) -> ChatResult:
        common = {
            "key": key,
            "id": req_id,
            "provider": self.config.provider,
            "model": self.config.model,
            "attempts": attempts,
        }
        if last is None:
            return ChatResult(
                **common,
                status="failed",
                error_kind="aborted",
                reason="aborted: not sent, the batch stopped on its failure rate",
            )
        if last.kind is not None:
            return ChatResult(
                **common,
                status="failed",
                reason=last.reason,
                error_kind=last.kind,
                http_status=last.http_status,
                latency_s=last.latency_s,
            )
        p = last.parsed
        assert p is not None
        return ChatResult(
            **common,
            status="ok",
            http_status=last.http_status,
            content=self.redact(p.content) if p.content is not None else None,
            finish_reason=p.finish_reason,
            top_logprobs=p.top_logprobs,
            prompt_tokens=p.prompt_tokens,
            completion_tokens=p.completion_tokens,
            latency_s=last.latency_s,
            response_model=p.response_model,
            raw=self.redact_json(last.raw),
        )

    def account(self, result: ChatResult, payload: Mapping[str, Any]) -> None:
        if result.ok:
            self.cache.put(result, payload)  # committed before anyone counts it as done
        if result.error_kind == "aborted":
            return
        self.completed += 1
        if not result.ok:
            kind = result.error_kind or "unknown"
            self.failed += 1
            self.failures[kind] += 1
            self.example_reason.setdefault(kind, result.reason or "")
            log.info("%s: failed after %d attempts: %s", result.id, result.attempts, result.reason)
        cfg = self.config
        if (
            not self.aborted
            and self.completed >= cfg.min_requests_for_abort
            and self.failed / self.completed > cfg.max_failure_rate
        ):
            self.aborted = True  # tasks check this before each attempt; in-flight ones finish
            log.error("stopping the batch: %s", self.abort_line())

    def abort_line(self) -> str:
        top = self.failures.most_common(3)
        kinds = ", ".join(f"{k} x{n}" for k, n in top)
        example = self.example_reason.get(top[0][0], "")[:80] if top else ""
        return (
            f"{self.failed} of {self.completed} requests to {self.config.model} at {self.url} "
            f"failed ({self.failed / self.completed:.0%} > max_failure_rate "
            f"{self.config.max_failure_rate:.0%}); most common: {kinds} (e.g. {example!r})"
        )


async def run_requests_async(
    requests: Sequence[ChatRequest],
    config: ClientConfig,
    cache_path: str | Path,
    *,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
) -> list[ChatResult]:
    """Results for `requests` in order: cached successes are reused, the rest are sent.

    Requests with the same payload and `sample` are sent once and share the answer.
    """
    api_key = resolve_api_key(config)
    ids: set[str] = set()
    by_key: dict[str, list[int]] = {}
    payloads: dict[str, dict[str, Any]] = {}
    for i, req in enumerate(requests):
        req.validate()
        if req.id in ids:
            raise UserError(f"request id {req.id!r} appears twice in the batch; ids must be unique")
        ids.add(req.id)
        payload = build_payload(req, config)
        key = request_key(config, payload, req.sample)
        by_key.setdefault(key, []).append(i)
        payloads[key] = payload

    total = len(requests)
    results: list[ChatResult | None] = [None] * total
    with ResultCache(cache_path) as cache:
        todo = []
        for key, idxs in by_key.items():
            hit = cache.get(key)
            if hit is None:
                todo.append(key)
                continue
            for i in idxs:
                results[i] = replace(hit, id=requests[i].id, from_cache=True)
        done = total - sum(len(by_key[k]) for k in todo)
        if progress is not None:
            progress(done, total)
        log.info(
            "%s: %d of %d requests cached, sending %d", config.model, done, total, total - done
        )

        limits = httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
        )
        # A local server never needs the environment's HTTP(S)_PROXY.
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s), limits=limits, trust_env=not config.is_local
        ) as client:
            batch = _Batch(config, api_key, cache, client, sleep)

            async def one(key: str) -> None:
                nonlocal done
                idxs = by_key[key]
                result = await batch.run_one(key, payloads[key], requests[idxs[0]].id)
                for i in idxs:
                    results[i] = replace(result, id=requests[i].id)
                done += len(idxs)
                if progress is not None:
                    progress(done, total)

            await asyncio.gather(*(one(k) for k in todo))

    final = [r for r in results if r is not None]
    assert len(final) == total, "every request ends with a result"
    n_ok = sum(r.ok for r in final)
    log.info(
        "%s: %d ok (%d from cache), %d failed",
        config.model,
        n_ok,
        sum(r.from_cache for r in final),
        total - n_ok,
    )
    if batch.aborted:
        raise FailureRateExceeded(
            f"{batch.abort_line()}; successful results are cached in {cache_path}", final
        )
    return final


def run_requests(
    requests: Sequence[ChatRequest],
    config: ClientConfig,
    cache_path: str | Path,
    *,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
) -> list[ChatResult]:
    """Synchronous wrapper of `run_requests_async` (not callable from inside a running loop)."""
    return asyncio.run(
        run_requests_async(requests, config, cache_path, progress=progress, sleep=sleep)
    )
