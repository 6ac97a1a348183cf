"""A fake OpenAI/Anthropic chat server on 127.0.0.1 with faults chosen by the request text.

Used by tests/test_chat_api.py (in a thread of the test process). Directives written in the last
user message pick the fault, counted per distinct message text (so per request):

    {500*2}       the first 2 attempts get HTTP 500, then success (any 3-digit code works)
    {400}         every attempt gets HTTP 400 (no `*n`: all attempts)
    {429:2*1}     HTTP 429 with `Retry-After: 2` on the first attempt
    {slow:0.6*1}  sleep 0.6 s before answering the first attempt (to pass a client timeout)
    {badjson*1}   200 with a body that is not JSON
    {drop*1}      close the socket without any reply
    {echokey}     HTTP 400 whose body echoes the authorization / x-api-key headers
    {echokey:500*1}  the same with HTTP 500 on the first attempt (so it is retried)
    {nologprobs}  answer without logprobs even when asked

`faults_enabled = False` makes every request succeed (to re-run the same payloads healthy).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIRECTIVE = re.compile(r"\{(?P<kind>\d{3}|[a-z]+)(?::(?P<arg>[\d.]+))?(?:\*(?P<n>\d+))?\}")


class FaultServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []  # every request received: path, headers, payload
        self.attempts: Counter[str] = Counter()  # per last-user-message text
        self.ok_replies = 0
        self.faults_enabled = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real API

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                # The client gave up (timeout) or we dropped the socket on purpose.
                with contextlib.suppress(OSError):
                    super().handle()

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                payload = json.loads(self.rfile.read(length))
                server.handle(self, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def contents(self) -> list[str]:
        with self.lock:
            return [r["content"] for r in self.log]

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.attempts.clear()

    # -- request handling (runs in the handler thread) --

    def handle(self, h: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        users = [m["content"] for m in payload["messages"] if m["role"] == "user"]
        content = users[-1] if users else ""
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self.lock:
            self.attempts[content] += 1
            attempt = self.attempts[content]
            self.log.append(
                {"path": h.path, "headers": headers, "payload": payload, "content": content}
            )
        logprobs = payload.get("logprobs", False)
        if self.faults_enabled:
            for m in _DIRECTIVE.finditer(content):
                n = int(m["n"]) if m["n"] else None
                if n is not None and attempt > n:
                    continue
                kind, arg = m["kind"], m["arg"]
                if kind in ("slow", "delay"):
                    time.sleep(float(arg or 0))
                elif kind == "drop":
                    h.close_connection = True
                    h.connection.shutdown(socket.SHUT_RDWR)
                    return
                elif kind == "badjson":
                    return self.send(h, 200, b'{"choices": [ {"message": tru')
                elif kind == "echokey":
                    echo = {
                        "error": "bad auth",
                        "got": [headers.get("authorization"), headers.get("x-api-key")],
                    }
                    return self.send(h, int(arg or 400), json.dumps(echo).encode())
                elif kind == "nologprobs":
                    logprobs = False
                elif kind.isdigit():
                    extra = {"retry-after": arg} if arg else {}
                    body = json.dumps({"error": {"message": f"injected {kind}"}}).encode()
                    return self.send(h, int(kind), body, extra)
        if h.path.endswith("/v1/messages"):
            reply = self.anthropic_reply(payload, content)
        else:
            reply = self.openai_reply(payload, content, logprobs)
        with self.lock:
            self.ok_replies += 1
        self.send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def top(k: int, first: int) -> list[dict[str, Any]]:
        # Deterministic alternatives: digits first, first+1, ... with falling logprobs.
        return [
            {"token": str((first + i) % 10), "logprob": -0.5 * i - 0.125, "bytes": [48 + i]}
            for i in range(k)
        ]

    def openai_reply(self, payload: dict[str, Any], content: str, logprobs: bool) -> dict:
        k = payload.get("top_logprobs", 0)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": "7\n" if logprobs else f"ok:{content}"},
            "finish_reason": "stop",
            "logprobs": None,
        }
        if logprobs:
            choice["logprobs"] = {
                "content": [
                    {
                        "token": "7",
                        "logprob": -0.125,
                        "bytes": [55],
                        "top_logprobs": self.top(k, 7),
                    },
                    {
                        "token": "\n",
                        "logprob": -0.01,
                        "bytes": [10],
                        "top_logprobs": self.top(k, 0),
                    },
                ]
            }
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": payload["model"] + "-2024-01-01",
            "choices": [choice],
            "usage": {
                "prompt_tokens": 10 + len(content),
                "completion_tokens": 2,
                "total_tokens": 12 + len(content),
            },
        }

    @staticmethod
    def anthropic_reply(payload: dict[str, Any], content: str) -> dict:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": payload["model"],
            "content": [{"type": "text", "text": f"ok:{content}"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 20 + len(content), "output_tokens": 5},
        }
