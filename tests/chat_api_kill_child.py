"""Child process for the kill -9 test in tests/test_chat_api.py: runs one batch, gets killed.

    PYTHONPATH=. python tests/chat_api_kill_child.py SERVER_URL CACHE_PATH N

The test imports `make_config` and `make_batch` from this file so both runs send the same batch.
"""

from __future__ import annotations

import sys

from persona_cli.chat_api import ChatRequest, ClientConfig, run_requests


def make_config(server_url: str) -> ClientConfig:
    return ClientConfig(
        provider="openai",
        model="kill-test",
        base_url=f"{server_url}/v1",
        api_key_env="PERSONA_TEST_NO_KEY",
        max_concurrency=4,
        timeout_s=10.0,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
    )


def make_batch(n: int) -> list[ChatRequest]:
    # {slow:0.04}: each reply takes 40 ms, so the batch is still running when the test kills it.
    return [
        ChatRequest(id=f"k{i}", messages=[{"role": "user", "content": f"q{i} {{slow:0.04}}"}])
        for i in range(n)
    ]


if __name__ == "__main__":
    url, cache_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_requests(make_batch(n), make_config(url), cache_path)
