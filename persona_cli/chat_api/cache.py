"""Persistent cache of successful chat results, in one sqlite3 file inside the run directory.

Why sqlite (stdlib) in WAL mode rather than an append-only JSONL:
- Crash safety is sqlite's job, not ours: each insert is one transaction; WAL frames carry
  checksums, so a process killed mid-write (kill -9) leaves a torn frame that the next open
  discards, and every committed row stays readable.
- With synchronous=NORMAL a commit is in the OS page cache when `put` returns, so it survives
  the death of the process (only an OS crash could drop the last few, which are then re-sent:
  a lost cache row costs a request, never a wrong answer).
- Lookup by key without reading the whole file, and two processes sharing a run directory are
  serialised by sqlite's locks instead of interleaving lines.
Only "ok" results are stored; failures are retried on the next run.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from persona_cli.chat_api.records import ChatResult, canonical_json
from persona_cli.errors import UserError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_results (
    key TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    request BLOB NOT NULL,
    record BLOB NOT NULL
)
"""


class ResultCache:
    """`get(key)` -> ChatResult | None and `put(result, payload)`; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: autocommit, so each put() is its own committed transaction.
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a readable chat cache ({exc})") from exc

    def get(self, key: str) -> ChatResult | None:
        row = self._conn.execute("SELECT record FROM chat_results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            result = ChatResult.from_dict(orjson.loads(row[0]))
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            # Treat a bad row as a miss: the request is re-sent and the row overwritten.
            log.warning("cache %s: ignoring unreadable entry %s… (%s)", self.path, key[:12], exc)
            return None
        if result.key != key or not result.ok:
            log.warning("cache %s: ignoring inconsistent entry %s…", self.path, key[:12])
            return None
        return result

    def put(self, result: ChatResult, payload: Any) -> None:
        if not result.ok:
            return  # failures are retried next run, never cached
        record = result.to_dict()
        record["from_cache"] = False
        self._conn.execute(
            "INSERT OR REPLACE INTO chat_results (key, created_at, request, record) "
            "VALUES (?, ?, ?, ?)",
            (result.key, time.time(), canonical_json(payload), orjson.dumps(record)),
        )

    def keys(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT key FROM chat_results")}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
