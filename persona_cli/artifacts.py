"""Reading and writing artifact files: gzipped JSONL rows, JSON documents, file hashes.

Every file a stage writes goes through `JsonlWriter` or `write_json`, which write to a temporary
file in the same directory and `os.replace` it into place after an fsync. A process killed
mid-write therefore leaves either the previous file or none under the final name, never a
truncated file that parses. Gzip output is byte-reproducible (mtime 0, no embedded file name) and
rows are serialised with sorted keys, so identical rows give identical sha256 hashes.

Reading is streaming (`iter_jsonl`), so files of any size work in constant memory, and every
problem is reported as `FILE:LINE: what is wrong` through `InputError`.

    from persona_cli.artifacts import JsonlWriter, iter_jsonl
    with JsonlWriter(run.path / "samples.jsonl.gz", schema_version=1) as out:
        out.write({"text": "..."})
    rows = list(iter_jsonl(path))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from persona_cli.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
_DUMP_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
TMP_MARK = ".tmp-"  # temporary files are named `.NAME.tmp-XXXX`; a run directory sweeps them


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems do not support opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    return Path(name)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON for documents: sorted keys, 2-space indent, trailing newline."""
    return orjson.dumps(obj, option=_DUMP_OPTIONS | orjson.OPT_INDENT_2) + b"\n"


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, dumps_json(obj))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a JSON file") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        line = data[: e.pos].count(b"\n") + 1 if e.pos is not None else None
        raise InputError(path, f"invalid JSON: {e.msg}", line=line) from None


class JsonlWriter:
    """Streams rows into a (gzipped, if the name ends in .gz) JSONL file, atomically.

    Rows become visible under `path` only when the `with` block exits normally; on an exception
    the temporary file is removed and any earlier file under `path` is left untouched.
    `schema_version`, when given, is stamped on every row that does not carry one.
    """

    def __init__(self, path: str | Path, *, schema_version: int | None = None):
        self.path = Path(path)
        self.schema_version = schema_version
        self.count = 0
        self._tmp: Path | None = None
        self._raw: io.BufferedWriter | None = None
        self._stream: Any = None

    def __enter__(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_path(self.path)
        self._raw = open(self._tmp, "wb")
        if self.path.name.endswith(".gz"):
            # mtime=0 and an empty name keep the bytes a function of the rows alone.
            self._stream = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
        else:
            self._stream = self._raw
        return self

    def write(self, row: dict[str, Any]) -> None:
        if self.schema_version is not None and "schema_version" not in row:
            row = {"schema_version": self.schema_version, **row}
        self._stream.write(orjson.dumps(row, option=_DUMP_OPTIONS) + b"\n")
        self.count += 1

    def write_all(self, rows: Iterable[dict[str, Any]]) -> int:
        for row in rows:
            self.write(row)
        return self.count

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None and self._raw is not None
        try:
            if self._stream is not self._raw:
                self._stream.close()
            if exc_type is None:
                self._raw.flush()
                os.fsync(self._raw.fileno())
        finally:
            self._raw.close()
        if exc_type is None:
            _commit(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def write_jsonl(
    path: str | Path, rows: Iterable[dict[str, Any]], *, schema_version: int | None = None
) -> int:
    """Write all `rows` atomically; returns the number written."""
    with JsonlWriter(path, schema_version=schema_version) as out:
        return out.write_all(rows)


def _open_rows(path: Path) -> io.BufferedIOBase:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - handed to the caller, closed there
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a JSONL file") from None
    # Decide by content, not name: a `.jsonl` that is really gzipped still reads.
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield `(line_number, row, problem)` for each non-blank line.

    Exactly one of `row` and `problem` is set. A corrupt or truncated gzip stream yields one last
    problem for the line where reading broke and stops. Blank lines are skipped.
    """
    path = Path(path)
    stream = _open_rows(path)
    lineno = 0
    try:
        while True:
            try:
                line = stream.readline()
            except EOFError:
                yield (
                    lineno + 1,
                    None,
                    (
                        f"truncated gzip stream: the file ends inside compressed data "
                        f"after {lineno} complete line(s)"
                    ),
                )
                return
            except (gzip.BadGzipFile, zlib.error, OSError) as e:
                yield lineno + 1, None, f"corrupt gzip data ({e})"
                return
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON: {e.msg}"
                continue
            if not isinstance(row, dict):
                yield lineno, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield lineno, row, None
    finally:
        stream.close()


RowCheck = Callable[[dict[str, Any]], list[str]]


def iter_jsonl(path: str | Path, check: RowCheck | None = None) -> Iterator[dict[str, Any]]:
    """Stream rows; the first malformed line raises `InputError` as `FILE:LINE: problem`.

    `check` returns a list of problems for a row (empty when valid), e.g. a schema's `check`.
    """
    for lineno, row, problem in iter_jsonl_lines(path):
        if problem is None and check is not None:
            problems = check(row)  # type: ignore[arg-type]
            problem = problems[0] if problems else None
        if problem is not None:
            raise InputError(path, problem, line=lineno)
        yield row  # type: ignore[misc]


def read_jsonl(path: str | Path, check: RowCheck | None = None) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, check))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of the canonical (sorted-key, compact) JSON of `obj`."""
    return sha256_bytes(orjson.dumps(obj, option=_DUMP_OPTIONS))
