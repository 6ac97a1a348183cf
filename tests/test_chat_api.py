"""Tests of persona_cli.chat_api against a real HTTP server on 127.0.0.1 with injected faults.

    python -m pytest tests/test_chat_api.py -q

The server (tests/chat_api_fault_server.py) picks faults from directives in the request text;
the kill -9 test runs tests/chat_api_kill_child.py in a subprocess.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from persona_cli.chat_api import (
    ChatRequest,
    ChatResult,
    ClientConfig,
    FailureRateExceeded,
    ResultCache,
    cache_key,
    run_requests,
    usage_by_model,
)
from persona_cli.chat_api.client import _retry_after_s
from persona_cli.errors import UserError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load(name: str) -> ModuleType:
    # By path, so the helpers load whatever pytest's import mode or a future tests/__init__.py.
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fault_server = _load("chat_api_fault_server")
kill_child = _load("chat_api_kill_child")


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PERSONA_TEST_NO_KEY", "PERSONA_TEST_UNSET_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with fault_server.FaultServer() as s:
        yield s


def cfg(server, **overrides) -> ClientConfig:
    base = {
        "provider": "openai",
        "model": "m",
        "base_url": f"{server.url}/v1",
        "api_key_env": "PERSONA_TEST_NO_KEY",
        "max_retries": 3,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.01,
        "timeout_s": 2.0,
        "max_concurrency": 4,
    }
    base.update(overrides)
    return ClientConfig(**base)


def req(text: str, rid: str | None = None, sample: int = 0) -> ChatRequest:
    return ChatRequest(id=rid or text, messages=[{"role": "user", "content": text}], sample=sample)


def test_openai_success_with_top_logprobs(server, tmp_path):
    config = cfg(server, temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=5)
    messages = [
        {"role": "system", "content": "You are a judge."},
        {"role": "user", "content": "Score it."},
    ]
    [r] = run_requests([ChatRequest("j1", messages)], config, tmp_path / "c.sqlite")

    assert r.status == "ok" and r.reason is None and r.attempts == 1
    assert r.content == "7\n" and r.finish_reason == "stop"
    # Expected values written out by hand from the server's reply, not recomputed by our parser.
    assert r.top_logprobs == [
        [
            {"token": "7", "logprob": -0.125},
            {"token": "8", "logprob": -0.625},
            {"token": "9", "logprob": -1.125},
            {"token": "0", "logprob": -1.625},
            {"token": "1", "logprob": -2.125},
        ],
        [
            {"token": "0", "logprob": -0.125},
            {"token": "1", "logprob": -0.625},
            {"token": "2", "logprob": -1.125},
            {"token": "3", "logprob": -1.625},
            {"token": "4", "logprob": -2.125},
        ],
    ]
    assert (r.prompt_tokens, r.completion_tokens) == (10 + len("Score it."), 2)
    assert r.model == "m" and r.response_model == "m-2024-01-01"
    assert r.raw["id"] == "chatcmpl-1" and r.latency_s is not None and r.latency_s > 0
    [sent] = server.log
    assert sent["path"] == "/v1/chat/completions"
    assert sent["payload"] == {
        "model": "m",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": 1,
        "n": 1,
        "logprobs": True,
        "top_logprobs": 5,
    }
    assert "authorization" not in sent["headers"]  # localhost, no key set: none sent
    row = orjson.loads(orjson.dumps(r.to_dict()))
    assert row["schema_version"] == 1 and ChatResult.from_dict(row) == r


def test_anthropic_success(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_TEST_ANTH_KEY", "anth-test-key")
    config = cfg(
        server,
        provider="anthropic",
        model="claude-x",
        base_url=server.url,
        api_key_env="PERSONA_TEST_ANTH_KEY",
        temperature=0.5,
        max_tokens=64,
    )
    messages = [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "hello"},
    ]
    [r] = run_requests([ChatRequest("a1", messages)], config, tmp_path / "c.sqlite")

    assert r.status == "ok" and r.content == "ok:hello" and r.finish_reason == "end_turn"
    assert (r.prompt_tokens, r.completion_tokens) == (25, 5) and r.top_logprobs is None
    [sent] = server.log
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == "anth-test-key"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["payload"] == {
        "model": "claude-x",
        "system": "Be a pirate.",
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0.5,
        "max_tokens": 64,
    }


def test_faults_end_ok_or_failed_with_reason_and_attempts_counted(server, tmp_path):
    # text -> (status, attempts) with max_retries=3 (4 attempts at most)
    expected = {
        "{500*2} a": ("ok", 3),
        "{503*1} b": ("ok", 2),
        "{429*1} c": ("ok", 2),
        "{slow:0.6*1} d": ("ok", 2),  # first attempt passes the 0.25 s timeout
        "{badjson*1} e": ("ok", 2),
        "{drop*1} f": ("ok", 2),
        "{400} g": ("failed", 1),  # other 4xx: never retried
        "{500} h": ("failed", 4),  # retries exhausted
        "plain i": ("ok", 1),
    }
    batch = [req(t) for t in expected]
    results = run_requests(batch, cfg(server, timeout_s=0.25), tmp_path / "c.sqlite")

    assert [r.id for r in results] == [b.id for b in batch]  # none lost, order kept
    for r in results:
        status, attempts = expected[r.id]
        assert (r.status, r.attempts) == (status, attempts), r
        assert server.attempts[r.id] == attempts  # what the server saw agrees
        if r.ok:
            assert r.content == f"ok:{r.id}" and r.reason is None
        else:
            assert r.reason and r.error_kind
    by_id = {r.id: r for r in results}
    assert by_id["{400} g"].error_kind == "http_400" and by_id["{400} g"].http_status == 400
    assert by_id["{400} g"].reason.startswith("HTTP 400: ")
    assert "injected 400" in by_id["{400} g"].reason  # body excerpt kept
    assert by_id["{500} h"].error_kind == "http_500"


def test_missing_logprobs_fails_without_retry(server, tmp_path):
    config = cfg(server, logprobs=True, top_logprobs=3)
    [r] = run_requests([req("{nologprobs} x")], config, tmp_path / "c.sqlite")
    assert (r.status, r.error_kind, r.attempts) == ("failed", "missing_logprobs", 1)


def test_retry_after_honoured_and_jitter_seeded(server, tmp_path):
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    config = cfg(server, backoff_base_s=0.5, backoff_max_s=30.0, max_concurrency=1)
    [r] = run_requests([req("{429:2*1} a")], config, tmp_path / "1.sqlite", sleep=record)
    assert r.ok and r.attempts == 2 and slept == [2.0]

    def jitter_run(cache: str, seed: int) -> list[float]:
        slept.clear()
        server.reset_log()
        c = cfg(server, backoff_base_s=0.5, backoff_max_s=30.0, jitter_seed=seed)
        [res] = run_requests([req("{500*2} b")], c, tmp_path / cache, sleep=record)
        assert res.ok and res.attempts == 3
        return list(slept)

    first = jitter_run("2.sqlite", seed=0)
    assert len(first) == 2 and 0 <= first[0] <= 0.5 and 0 <= first[1] <= 1.0
    assert jitter_run("3.sqlite", seed=0) == first  # same seed, same waits
    assert jitter_run("4.sqlite", seed=1) != first


def test_retry_after_header_forms():
    import httpx

    assert _retry_after_s(httpx.Headers({"retry-after": "3"})) == 3.0
    assert _retry_after_s(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert _retry_after_s(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0
    assert _retry_after_s(httpx.Headers({"retry-after": "soon"})) is None
    assert _retry_after_s(httpx.Headers({})) is None


def test_rerun_sends_nothing_for_cached_and_retries_only_failed(server, tmp_path):
    cache = tmp_path / "c.sqlite"
    batch = [req(f"plain {i}") for i in range(4)] + [req("{400} x"), req("{400} y")]
    config = cfg(server)
    first = run_requests(batch, config, cache)
    assert [r.status for r in first] == ["ok"] * 4 + ["failed"] * 2
    assert len(server.log) == 6

    server.reset_log()
    server.faults_enabled = False  # same payloads, healthy server
    second = run_requests(batch, config, cache)
    assert sorted(server.contents()) == ["{400} x", "{400} y"]
    assert all(r.ok for r in second)
    assert [r.from_cache for r in second] == [True] * 4 + [False] * 2
    assert [r.content for r in second[:4]] == [r.content for r in first[:4]]

    server.reset_log()
    third = run_requests(batch, config, cache)
    assert server.log == [] and all(r.ok and r.from_cache for r in third)


def test_same_payload_sent_once_per_sample(server, tmp_path):
    batch = [req("same", "a"), req("same", "b"), req("same", "c", sample=1)]
    results = run_requests(batch, cfg(server), tmp_path / "c.sqlite")
    assert [r.id for r in results] == ["a", "b", "c"] and all(r.ok for r in results)
    assert len(server.log) == 2  # a and b share one request; sample 1 is a separate draw
    assert results[0].key == results[1].key != results[2].key
    with pytest.raises(UserError, match="appears twice"):
        run_requests([req("x", "dup"), req("y", "dup")], cfg(server), tmp_path / "c.sqlite")


def test_kill9_mid_batch_leaves_readable_cache(server, tmp_path):
    n = 40
    cache = tmp_path / "run" / "chat_cache.sqlite"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "chat_api_kill_child.py"), server.url, str(cache), str(n)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while server.ok_replies < 12:
        if proc.poll() is not None:
            pytest.fail(f"child ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "child made no progress"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.2)  # let server threads finish logging requests the child had already sent

    # The child never closed the cache, so its commits are still in its WAL file. Keep a copy
    # of it torn mid-frame (as a kill during a write would leave it) before anything opens it.
    wal = Path(f"{cache}-wal")
    assert wal.stat().st_size > 4096
    torn = tmp_path / "torn" / "chat_cache.sqlite"
    torn.parent.mkdir()
    shutil.copy(cache, torn)
    data = wal.read_bytes()
    Path(f"{torn}-wal").write_bytes(data[: len(data) - 123])

    config = kill_child.make_config(server.url)
    batch = kill_child.make_batch(n)
    by_key = {cache_key(r, config): r for r in batch}
    with ResultCache(cache) as c:
        cached = c.keys()
        for k in cached:
            hit = c.get(k)
            assert hit is not None and hit.content == f"ok:{by_key[k].messages[0]['content']}"
    assert 0 < len(cached) < n, "kill landed mid-batch"

    # A WAL torn mid-frame must still open, with only whole entries.
    with ResultCache(torn) as c:
        torn_keys = c.keys()
        assert torn_keys < cached  # the last, torn transaction is dropped, the rest kept
        assert all(c.get(k) is not None for k in torn_keys)

    server.reset_log()
    results = run_requests(batch, config, cache)
    expected = sorted(r.messages[0]["content"] for k, r in by_key.items() if k not in cached)
    assert sorted(server.contents()) == expected  # only what had not succeeded, each once
    assert all(r.ok for r in results)
    assert sum(r.from_cache for r in results) == len(cached)


def test_failure_rate_guard_stops_the_batch(server, tmp_path):
    cache = tmp_path / "c.sqlite"
    batch = [req(f"plain {i}") for i in range(5)] + [req(f"{{400}} {i}") for i in range(25)]
    config = cfg(server, max_concurrency=1)  # in order, so the stop point is exact
    with pytest.raises(FailureRateExceeded) as info:
        run_requests(batch, config, cache)

    message = str(info.value)
    assert "\n" not in message
    assert "15 of 20 requests" in message and "http_400 x15" in message
    assert isinstance(info.value, UserError)
    assert len(server.log) == 20  # nothing sent after the guard tripped
    assert len(info.value.results) == 30
    assert sum(r.error_kind == "aborted" for r in info.value.results) == 10
    with ResultCache(cache) as c:
        assert c.keys() == {r.key for r in info.value.results if r.ok}
        assert len(c.keys()) == 5


def test_failure_rate_guard_waits_for_min_requests(server, tmp_path):
    batch = [req(f"{{400}} {i}") for i in range(19)]
    results = run_requests(batch, cfg(server), tmp_path / "c.sqlite")
    assert all(r.error_kind == "http_400" for r in results)


def test_api_key_never_leaks(server, tmp_path, monkeypatch, caplog):
    secret = f"sk-LEAKCHECK-{uuid.uuid4().hex}"
    monkeypatch.setenv("PERSONA_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    cache = tmp_path / "run" / "chat_cache.sqlite"
    configs = [
        cfg(server, api_key_env="PERSONA_TEST_KEY"),
        cfg(server, api_key_env="PERSONA_TEST_KEY", provider="anthropic", base_url=server.url),
    ]
    for config in configs:
        batch = [req("{echokey} a"), req("{echokey:500*1} b"), req("{500*1} c"), req("plain d")]
        results = run_requests(batch, config, cache)
        assert [r.status for r in results] == ["failed", "ok", "ok", "ok"]
        assert "[REDACTED]" in results[0].reason  # the server did echo the key back
        texts += [orjson.dumps([r.to_dict() for r in results]).decode(), repr(results)]
        with pytest.raises(FailureRateExceeded) as info:
            run_requests(
                [req(f"{{echokey}} {i}") for i in range(3)],
                ClientConfig(**{**config.__dict__, "min_requests_for_abort": 2}),
                tmp_path / "other" / "c.sqlite",
            )
        texts += [str(info.value), repr(info.value), repr(info.value.results)]
    # The key did travel, so the checks below are not vacuous.
    seen = [h["headers"].get("authorization") or h["headers"].get("x-api-key") for h in server.log]
    assert f"Bearer {secret}" in seen and secret in seen
    texts.append(caplog.text)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    with sqlite3.connect(cache) as conn:
        texts.append("\n".join(conn.iterdump()))
    assert caplog.text and len(texts) > 8
    for text in texts:
        assert secret not in text


def test_missing_key_for_remote_endpoint_names_the_variable(tmp_path):
    config = ClientConfig(
        provider="openai",
        model="gpt-x",
        base_url="https://api.openai.com/v1",
        api_key_env="PERSONA_TEST_UNSET_KEY",
    )
    with pytest.raises(UserError, match="PERSONA_TEST_UNSET_KEY is not set"):
        run_requests([req("hi")], config, tmp_path / "c.sqlite")


def test_malformed_key_is_a_user_error_without_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_TEST_KEY", "sk-caf\u00e9-secret")
    config = ClientConfig(
        provider="openai",
        model="m",
        base_url="http://127.0.0.1:1/v1",
        api_key_env="PERSONA_TEST_KEY",
    )
    with pytest.raises(UserError, match="PERSONA_TEST_KEY holds") as info:
        run_requests([req("hi")], config, tmp_path / "c.sqlite")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"provider": "anthropic", "logprobs": True}, "no logprobs"),
        ({"top_logprobs": 5}, "needs logprobs=True"),
        ({"provider": "cohere"}, "provider"),
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"max_failure_rate": 1.5}, "max_failure_rate"),
    ],
)
def test_config_errors_are_user_errors(overrides, match):
    base = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    with pytest.raises(UserError, match=match):
        ClientConfig(**{**base, **overrides})


def test_usage_totals_and_cost(server, tmp_path):
    cache = tmp_path / "c.sqlite"
    config = cfg(server, prompt_price_per_1m=2.0, completion_price_per_1m=8.0)
    texts = ["a", "bb", "ccc"]
    results = run_requests([req(t) for t in texts] + [req("{400} z")], config, cache)
    usage = usage_by_model(results, [config])
    prompt = sum(10 + len(t) for t in texts)  # the fake server's token counts
    assert set(usage) == {"m"}
    u = usage["m"]
    assert (u.requests, u.prompt_tokens, u.completion_tokens) == (3, prompt, 6)
    assert u.cost_usd == pytest.approx((prompt * 2.0 + 6 * 8.0) / 1e6)
    assert usage_by_model(results)["m"].cost_usd is None  # no prices given

    rerun = run_requests([req(t) for t in texts], config, cache)
    assert usage_by_model(rerun, [config], include_cached=False) == {}


def test_progress_reports_counts(server, tmp_path):
    calls: list[tuple[int, int]] = []
    batch = [req(f"p{i}") for i in range(5)]
    cache = tmp_path / "c.sqlite"
    run_requests(batch, cfg(server), cache, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5) and len(calls) == 6
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    run_requests(batch, cfg(server), cache, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(5, 5)]


def test_bad_cache_row_is_a_miss_and_bad_file_a_user_error(server, tmp_path):
    cache = tmp_path / "c.sqlite"
    config = cfg(server)
    run_requests([req("x")], config, cache)
    with sqlite3.connect(cache) as conn:
        conn.execute("UPDATE chat_results SET record = ?", (b'{"schema_version": 1, "ke',))
    server.reset_log()
    [r] = run_requests([req("x")], config, cache)
    assert r.ok and not r.from_cache and server.contents() == ["x"]

    not_db = tmp_path / "notes.txt"
    not_db.write_text("this is not sqlite\n" * 100)
    with pytest.raises(UserError, match=r"notes\.txt"):
        run_requests([req("x")], config, not_db)
