"""Run directories: the contract between stages.

Every command writes one directory (`--out`):

    config.json      written first: the resolved config, sorted keys
    ...              the command's artifacts (rows, tensors, summaries)
    manifest.json    what went in: input hashes, model, chat template, git, versions, device,
                     batch protocol, seeds, timing, command line
    DONE             written last; a chain step waits for this file, not for the directory

`open_run` decides what to do with an existing directory:
- DONE present: the run is finished and `state == "done"`; the command does nothing unless
  `force` (then the old contents are removed, DONE first, and the run starts afresh).
- config.json present but no DONE (an interrupted run): with the same config the run resumes
  (`state == "resumed"`; the command skips work whose files exist, which are complete because
  every file is written atomically); with a different config it refuses, naming the keys.
- anything else that is not empty and not a run directory: refused, never cleared.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from persona_cli import manifest as manifest_mod
from persona_cli import tracking
from persona_cli.artifacts import TMP_MARK, read_json, sha256_file, sha256_json, write_json
from persona_cli.errors import UserError
from persona_cli.protocol import RunProtocol, recorded_fields, required_fields
from persona_cli.schemas import CONFIG, CONFIG_VERSION, DONE, MANIFEST, MANIFEST_VERSION

ATTEMPTS = ".attempts.jsonl"  # one line per start of this run directory (resume history)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_done(path: str | Path) -> bool:
    return (Path(path) / DONE).is_file()


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_config_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


@dataclass
class RunDir:
    path: Path
    command: str
    config: dict[str, Any]
    state: str  # "new", "resumed" or "done"
    run_id: str
    started_monotonic: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=_now)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> bool:
        return self.state == "done"

    def _attempts(self) -> list[dict[str, Any]]:
        attempts = []
        p = self.path / ATTEMPTS
        if p.exists():
            for line in p.read_bytes().splitlines():
                try:
                    attempts.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # a torn last line from a kill; the history is advisory
        return attempts

    def output_hashes(self) -> dict[str, str]:
        out = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and rel not in (MANIFEST, DONE) and not p.name.startswith("."):
                out[rel] = sha256_file(p)
        return out

    def finish(
        self,
        *,
        inputs: dict[str, str | Path] | None = None,
        model: dict[str, Any] | None = None,
        chat_template: dict[str, Any] | None = None,
        protocol: RunProtocol | None = None,
        seeds: list[int] | None = None,
        extra: dict[str, Any] | None = None,
        argv: list[str] | None = None,
    ) -> dict[str, Any]:
        """Write manifest.json, then DONE. Returns the manifest.

        `inputs` maps a label to each input file; its sha256 is computed here so the manifest
        records exactly the bytes that were read. `protocol` is the run's `RunProtocol`; a
        manifest that lacks a field `protocol.REQUIRED_FIELDS` lists for this command is not
        written (a programming error: the guard could not see that field).
        """
        if protocol is not None and not isinstance(protocol, RunProtocol):
            raise TypeError(f"protocol must be a RunProtocol, not {type(protocol).__name__}")
        input_rows = {}
        for label, p in sorted((inputs or {}).items()):
            p = Path(p)
            input_rows[label] = {
                "path": str(p.resolve()),
                "sha256": sha256_file(p) if p.is_file() else None,
                "bytes": p.stat().st_size if p.is_file() else None,
            }
        attempts = self._attempts()
        env = manifest_mod.environment()
        finished_at = _now()
        doc = {
            "schema_version": MANIFEST_VERSION,
            "run_id": self.run_id,
            "command": self.command,
            "argv": manifest_mod.redact_argv(list(sys.argv if argv is None else argv)),
            "config_sha256": sha256_json(self.config),
            "inputs": input_rows,
            "outputs": self.output_hashes(),
            "model": model,
            "chat_template": chat_template,
            "protocol": (protocol or RunProtocol()).to_dict(),
            "seeds": list(seeds or []),
            "timing": {
                "first_started_at": attempts[0]["started_at"] if attempts else self.started_at,
                "started_at": self.started_at,
                "finished_at": finished_at,
                "wall_seconds": round(time.monotonic() - self.started_monotonic, 3),
                "attempts": len(attempts),
            },
            **env,
            **(extra or {}),
        }
        missing = required_fields(self.command) - set(recorded_fields(doc, self.path / MANIFEST))
        if missing:
            raise ValueError(
                f"{self.command}: the manifest would lack guarded field(s) {sorted(missing)}"
            )
        tracker = tracking.current()
        if tracker is not None:
            record = tracker.finish(self._summary_doc())
            if record is not None:
                doc["tracking"] = record
        write_json(self.path / MANIFEST, doc)
        write_json(
            self.path / DONE,
            {"finished_at": finished_at, "manifest_sha256": sha256_file(self.path / MANIFEST)},
        )
        self.state = "done"
        return doc

    def _summary_doc(self) -> dict[str, Any] | None:
        """The run's summary figures for a tracker (summary.json, else train_summary.json)."""
        for name in ("summary.json", "train_summary.json"):
            if (self.path / name).is_file():
                return read_json(self.path / name)
        return None


def _clear(path: Path) -> None:
    # DONE goes first so a crash half-way through clearing never leaves a "finished" stale run.
    (path / DONE).unlink(missing_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def open_run(
    out: str | Path, *, command: str, config: dict[str, Any], force: bool = False
) -> RunDir:
    """Create, resume or recognise as finished the run directory `out` (see module doc)."""
    path = Path(out)
    config = orjson.loads(orjson.dumps(config, option=orjson.OPT_SORT_KEYS))  # JSON-normalised
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        has_config = (path / CONFIG).is_file()
        if not has_config:
            raise UserError(
                f"--out {path}: directory is not empty and is not a persona-cli run "
                f"(no {CONFIG}); refusing to write into it"
            )
        recorded = read_json(path / CONFIG)
        if force:
            _clear(path)
        elif is_done(path):
            return RunDir(path, command, config, "done", run_id=_run_id_of(path))
        else:
            diffs = _config_diff(
                {"command": recorded.get("command"), **recorded.get("config", {})},
                {"command": command, **config},
            )
            if diffs:
                raise UserError(
                    f"--out {path}: holds an unfinished run with a different config "
                    f"({'; '.join(diffs[:5])}); pass --force to discard it or choose another --out"
                )
            run = RunDir(path, command, config, "resumed", run_id=recorded["run_id"])
            _sweep_temp_files(path)
            _record_attempt(run)
            _start_tracking(run)
            return run
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path, command, config, "new", run_id=uuid.uuid4().hex)
    write_json(
        path / CONFIG,
        {
            "schema_version": CONFIG_VERSION,
            "command": command,
            "run_id": run.run_id,
            "config": config,
        },
    )
    _record_attempt(run)
    _start_tracking(run)
    return run


def _start_tracking(run: RunDir) -> None:
    tracker = tracking.current()
    if tracker is not None:
        tracker.start(run.path, run.command, run.config)


def _run_id_of(path: Path) -> str:
    return str(read_json(path / CONFIG).get("run_id", ""))


def _sweep_temp_files(path: Path) -> None:
    # Leftovers of atomic writes a kill interrupted; the final names were never touched.
    for p in path.rglob(f".*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)


def _record_attempt(run: RunDir) -> None:
    line = orjson.dumps(
        {
            "started_at": run.started_at,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": run.state,
        }
    )
    with open(run.path / ATTEMPTS, "ab") as f:
        f.write(line + b"\n")
