"""The one client layer for chat models: every judge and teacher request goes through here.

Used by `judge-align` (an LLM judge scoring answers 0-100, often from the top-20 logprobs of a
single token) and `replay-trace` (N teacher models answering prompts). Two wire formats:
OpenAI-compatible `/v1/chat/completions` (OpenAI, `vllm serve`) and the Anthropic Messages API.

    from persona_cli.chat_api import ChatRequest, ClientConfig, run_requests, usage_by_model

    config = ClientConfig(provider="openai", model="gpt-4o-mini",
                          base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY",
                          temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=20)
    reqs = [ChatRequest(id=f"row{i}", messages=[{"role": "user", "content": p}])
            for i, p in enumerate(prompts)]
    results = run_requests(reqs, config, run_dir / "chat_cache.sqlite",
                           progress=lambda done, total: bar.update(task, completed=done))
    rows = [r.to_dict() for r in results]           # r.status "ok" | "failed" (+ r.reason)
    spend = usage_by_model(results, [config])       # tokens (and USD when priced) per model

Guarantees:
- One `ChatResult` per request, in order; a failed request never raises. Retries with full-jitter
  exponential backoff on 429 (Retry-After honoured), 5xx, timeouts, dropped connections and
  malformed bodies; other 4xx fail at once with the status and a body excerpt.
- Successful results are cached in sqlite (cache.py says why sqlite) under a key that hashes
  provider, base_url, model, the request payload and the sample index, so a re-run, or a run
  after kill -9, sends only what has not succeeded yet. Failures are not cached.
- After `min_requests_for_abort` sent requests, a failed share above `max_failure_rate` stops the
  batch with `FailureRateExceeded` (a `UserError`, one line).
- The API key is read from the environment variable named in the config and is redacted from
  results, reasons, logs and the cache. The library never prints; it logs to `logging`.
"""

from persona_cli.lazy import lazy_exports

# Imported on first use: the client pulls in httpx and sqlite, which `--help` must not pay for.
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "ResultCache": "persona_cli.chat_api.cache",
        "FailureRateExceeded": "persona_cli.chat_api.client",
        "run_requests": "persona_cli.chat_api.client",
        "run_requests_async": "persona_cli.chat_api.client",
        "ClientConfig": "persona_cli.chat_api.config",
        "resolve_api_key": "persona_cli.chat_api.config",
        "build_payload": "persona_cli.chat_api.providers",
        "cache_key": "persona_cli.chat_api.providers",
        "SCHEMA_VERSION": "persona_cli.chat_api.records",
        "ChatRequest": "persona_cli.chat_api.records",
        "ChatResult": "persona_cli.chat_api.records",
        "ModelUsage": "persona_cli.chat_api.records",
        "request_key": "persona_cli.chat_api.records",
        "usage_by_model": "persona_cli.chat_api.records",
    },
)
