"""The run-directory contract: config first, manifest, DONE last; resume, refuse, --force."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persona_cli.artifacts import read_json, read_jsonl, write_jsonl
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol, redact_argv
from persona_cli.protocol import batch_protocol
from persona_cli.rundir import open_run
from persona_cli.schemas import MANIFEST_KEYS
from persona_cli.validate import validate_file

SAMPLE = {
    "persona": "assistant",
    "question_id": "q1",
    "question": "Q?",
    "sample_index": 0,
    "text": "A.",
    "n_tokens": 2,
    "finish_reason": "stop",
    "backend": "hf",
    "seed": 42,
}


def test_new_run_writes_config_first_and_done_last(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = open_run(out, command="demo", config={"lr": 1e-4, "seed": 42})
    assert run.state == "new"
    assert sorted(p.name for p in out.iterdir()) == [".attempts.jsonl", "config.json"]
    cfg = read_json(out / "config.json")
    assert cfg["config"] == {"lr": 1e-4, "seed": 42} and cfg["command"] == "demo"
    write_jsonl(out / "samples.jsonl.gz", [SAMPLE], schema_version=1)
    assert not (out / "DONE").exists()
    run.finish(seeds=[42])
    done_mtime = (out / "DONE").stat().st_mtime_ns
    assert done_mtime >= (out / "manifest.json").stat().st_mtime_ns
    assert validate_file(out).ok, validate_file(out).problems
    # Editing an output after the fact is caught against the manifest's hashes.
    write_jsonl(out / "samples.jsonl.gz", [{**SAMPLE, "text": "edited"}], schema_version=1)
    problems = validate_file(out).problems
    assert problems == [
        f"{out / 'samples.jsonl.gz'}: sha256 differs from the manifest (file changed)"
    ]


def test_manifest_contents(tmp_path: Path) -> None:
    inp = tmp_path / "data.jsonl"
    inp.write_bytes(b'{"messages": []}\n' * 1000)
    out = tmp_path / "run"
    run = open_run(out, command="demo", config={"a": 1})
    write_jsonl(out / "samples.jsonl.gz", [{"x": 1}])
    proto = BatchProtocol(per_device_batch=4, grad_accum=4, world_size=1, optimizer_steps=375)
    man = run.finish(
        inputs={"train": inp},
        protocol=batch_protocol(proto),
        seeds=[42, 137],
        argv=["persona-cli", "demo", "--api-key", "sk-abc"],
    )
    assert set(MANIFEST_KEYS) <= set(man)
    sha = subprocess.run(
        ["sha256sum", str(inp)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert man["inputs"]["train"]["sha256"] == sha
    out_sha = subprocess.run(
        ["sha256sum", str(out / "samples.jsonl.gz")], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert man["outputs"] == {
        "config.json": man["outputs"]["config.json"],
        "samples.jsonl.gz": out_sha,
    }
    assert man["protocol"]["effective_batch"] == 16
    assert man["protocol"]["optimizer_steps"] == 375
    assert man["seeds"] == [42, 137]
    assert man["argv"] == ["persona-cli", "demo", "--api-key", "***"]
    assert man["git"]["commit"] is None or len(man["git"]["commit"]) == 40
    assert man["packages"]["torch"] and man["packages"]["transformers"]
    assert man["device"]["type"] in ("cpu", "cuda")
    assert (
        read_json(out / "DONE")["manifest_sha256"]
        == subprocess.run(
            ["sha256sum", str(out / "manifest.json")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )


def test_argv_redaction_hides_env_secrets() -> None:
    secret = "sk-test-0123456789abcdef"
    argv = ["persona-cli", f"--url=http://x?key={secret}", "--token=abc12345", "--name", "v"]
    argv += ["--api-key", "abcdefgh", "--hf-token", "hf_abcdefgh"]
    # Counts of tokens and the name of a key's variable are what went in, not secrets.
    argv += ["--max-new-tokens", "12", "--answer-max-new-tokens=4", "--api-key-env", "MY_KEY"]
    assert redact_argv(argv, secrets=[secret]) == [
        "persona-cli",
        "--url=http://x?key=***",
        "--token=***",
        "--name",
        "v",
        "--api-key",
        "***",
        "--hf-token",
        "***",
        "--max-new-tokens",
        "12",
        "--answer-max-new-tokens=4",
        "--api-key-env",
        "MY_KEY",
    ]


def test_finished_run_is_a_noop_and_force_restarts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = open_run(out, command="demo", config={"a": 1})
    first.finish()
    again = open_run(out, command="demo", config={"a": 2})  # even a changed config: done is done
    assert again.state == "done" and again.run_id == first.run_id
    forced = open_run(out, command="demo", config={"a": 2}, force=True)
    assert forced.state == "new" and forced.run_id != first.run_id
    assert not (out / "DONE").exists() and not (out / "manifest.json").exists()
    assert read_json(out / "config.json")["config"] == {"a": 2}


def test_unfinished_run_with_other_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    open_run(out, command="demo", config={"lr": 1e-4, "nested": {"r": 32}})
    with pytest.raises(UserError) as e:
        open_run(out, command="demo", config={"lr": 2e-4, "nested": {"r": 32}})
    assert "lr: 0.0001 -> 0.0002" in str(e.value) and "--force" in str(e.value)


def test_non_run_directory_is_never_cleared(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a persona-cli run"):
        open_run(tmp_path, command="demo", config={}, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


STAGE = r"""
import sys, time
from persona_cli.artifacts import write_jsonl
from persona_cli.rundir import open_run
out, slow = sys.argv[1], sys.argv[2] == "slow"
run = open_run(out, command="chunks", config={"chunks": 6})
for i in range(6):
    part = run.file(f"part_{i:03d}.jsonl.gz")
    if part.exists():
        continue  # finished before the crash: files appear only when complete
    with open(run.file("work.log"), "a") as log:
        log.write(f"{i}\n")
    write_jsonl(part, ({"chunk": i, "row": r} for r in range(200)))
    if slow and i == 2:
        time.sleep(60)  # the parent kills us here
run.finish()
"""


def test_killed_stage_resumes_without_redoing_finished_parts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(out), "slow"])
    deadline = time.monotonic() + 60
    while not (out / "part_002.jsonl.gz").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists()
    subprocess.run([sys.executable, "-c", STAGE, str(out), "fast"], check=True)
    assert (out / "work.log").read_text().split() == ["0", "1", "2", "3", "4", "5"]
    assert read_json(out / "manifest.json")["timing"]["attempts"] == 2
    rows = [r for i in range(6) for r in read_jsonl(out / f"part_{i:03d}.jsonl.gz")]
    assert len(rows) == 1200
