"""Artifact I/O: round trips, reproducible bytes, atomicity under SIGKILL, malformed input."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from persona_cli.artifacts import (
    JsonlWriter,
    iter_jsonl,
    read_json,
    read_jsonl,
    sha256_file,
    write_json,
    write_jsonl,
)
from persona_cli.errors import InputError
from persona_cli.schemas import CHAT


def test_round_trip_100k_rows_streams_and_stamps_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl.gz"
    rows = (
        {"i": i, "text": f"row {i} é ✓", "score": i / 7, "flag": i % 2 == 0} for i in range(100_000)
    )
    assert write_jsonl(path, rows, schema_version=3) == 100_000
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzipped
    n = 0
    for n, row in enumerate(iter_jsonl(path)):
        assert row == {
            "schema_version": 3,
            "i": n,
            "text": f"row {n} é ✓",
            "score": n / 7,
            "flag": n % 2 == 0,
        }
    assert n == 99_999


def test_same_rows_give_identical_bytes(tmp_path: Path) -> None:
    rows = [{"b": 1, "a": [1, 2]}, {"a": "x"}]
    write_jsonl(tmp_path / "one.jsonl.gz", rows)
    time.sleep(1.1)  # a gzip header with a timestamp would now differ
    # Same content, keys in another order: sorted-key serialisation makes the bytes equal.
    write_jsonl(tmp_path / "two.jsonl.gz", [{"a": [1, 2], "b": 1}, {"a": "x"}])
    assert sha256_file(tmp_path / "one.jsonl.gz") == sha256_file(tmp_path / "two.jsonl.gz")


def test_plain_jsonl_and_json_documents(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    assert (tmp_path / "x.jsonl").read_bytes() == b'{"a":1}\n'
    write_json(tmp_path / "d.json", {"z": 1, "a": {"c": 2, "b": 1}})
    assert (
        tmp_path / "d.json"
    ).read_text() == '{\n  "a": {\n    "b": 1,\n    "c": 2\n  },\n  "z": 1\n}\n'
    assert read_json(tmp_path / "d.json") == {"z": 1, "a": {"c": 2, "b": 1}}


def test_exception_inside_writer_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl.gz"
    write_jsonl(path, [{"old": True}])
    with pytest.raises(RuntimeError), JsonlWriter(path) as w:
        w.write({"new": True})
        raise RuntimeError("boom")
    assert read_jsonl(path) == [{"old": True}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl.gz"]  # no temp file left


WRITER = r"""
import os, sys, time
from persona_cli.artifacts import JsonlWriter
path, flag = sys.argv[1], sys.argv[2]
with JsonlWriter(path, schema_version=1) as w:
    for i in range(10**9):
        w.write({"i": i, "pad": os.urandom(100).hex()})  # incompressible: bytes hit the disk
        if i == 5000:
            open(flag, "w").close()  # tell the parent we are mid-write
        if i > 5000:
            time.sleep(0.001)
"""


def _kill_mid_write(tmp_path: Path, path: Path) -> None:
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(flag)])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, "writer exited early"
        assert time.monotonic() < deadline, "writer never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The kill landed mid-write: the temporary file holds partial data.
    temps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert temps and temps[0].stat().st_size > 0


def test_kill_mid_write_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl.gz"
    _kill_mid_write(tmp_path, path)
    assert not path.exists()


def test_kill_mid_write_leaves_old_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl.gz"
    write_jsonl(path, [{"generation": "old", "i": i} for i in range(10)])
    before = path.read_bytes()
    _kill_mid_write(tmp_path, path)
    assert path.read_bytes() == before
    assert [r["generation"] for r in read_jsonl(path)] == ["old"] * 10


def _lines(path: Path, lines: list[bytes], gz: bool = True) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


GOOD = orjson.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


def test_truncated_gzip_names_file_and_line(tmp_path: Path) -> None:
    full = gzip.compress(b"".join(GOOD + b"\n" for _ in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError) as e:
        read_jsonl(path, CHAT.check)
    assert str(e.value).startswith(f"{path}:")
    assert "truncated gzip stream" in str(e.value)
    assert e.value.line is not None and 1 < e.value.line <= 2000


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"messages": [', "invalid JSON"),
        (b'{"text": "no messages"}', "missing field 'messages'"),
        (
            orjson.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
            ),
            "[1].role 'bot' is not one of system, user, assistant",
        ),
        (b"[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_malformed_line_reports_file_and_line(tmp_path: Path, line: bytes, expected: str) -> None:
    path = _lines(tmp_path / "data.jsonl.gz", [GOOD, GOOD, line, GOOD])
    with pytest.raises(InputError) as e:
        read_jsonl(path, CHAT.check)
    assert str(e.value).startswith(f"{path}:3: ")
    assert expected in str(e.value)
