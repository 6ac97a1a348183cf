"""API judges (OpenAI-compatible, vllm serve, Anthropic) through `persona_cli.chat_api`.

Every judge request goes through chat_api's `run_requests`: bounded concurrency, retries with
jittered backoff on 429/5xx/timeouts/dropped connections/malformed bodies, the sqlite cache
(its key hashes the endpoint, model and exact payload, i.e. judge model x rendered prompt, so a
re-run sends only what has not succeeded yet), the failure-rate guard and key redaction. This
module only builds the messages and hands back one `ChatResult` per (item, metric).

    python -c "from persona_cli.judge.remote import judge_messages; help(judge_messages)"
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from persona_cli.chat_api import ChatRequest, ChatResult, run_requests
from persona_cli.chat_template import NONE, SystemPrompt
from persona_cli.judge.config import JudgeConfig

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def judge_messages(prompt: str, system: SystemPrompt) -> list[dict[str, str]]:
    """The messages an API judge receives for one rendered judge prompt.

    `template-default` sends the user message alone (as published judges do; a vllm server
    then applies its template exactly as the local backend does with the same choice). `none`
    sends an empty system message, which is how a server whose template injects a default
    system prompt renders without it; TEXT sends that system message.
    """
    user = {"role": "user", "content": prompt}
    if system.mode == "text":
        return [{"role": "system", "content": system.text or ""}, user]
    if system.mode == NONE:
        return [{"role": "system", "content": ""}, user]
    return [user]


def judge_remote(
    prompts: Sequence[tuple[str, str]],
    config: JudgeConfig,
    cache_path: Path,
    progress: Progress | None = None,
) -> list[ChatResult]:
    """One result per `(request_id, rendered prompt)`, in order; raises FailureRateExceeded
    (a one-line UserError) when too many requests fail, with successes kept in the cache."""
    client = config.client_config()
    requests = [
        ChatRequest(id=rid, messages=judge_messages(text, config.system)) for rid, text in prompts
    ]
    log.info(
        "judging %d prompts with %s at %s (%s scoring)",
        len(requests),
        client.model,
        client.base_url,
        config.scoring_mode,
    )
    return run_requests(requests, client, cache_path, progress=progress)
