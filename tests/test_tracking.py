"""`--report-to wandb` in WANDB_MODE=offline: the local run files are read back.

A train-sft and an eval-markers run on tiny-random, each mirrored to an offline wandb run. The
`.wandb` file is read here with a small reader of its record log (LevelDB's log format: 32 KiB
blocks of checksummed fragments, after a 7-byte ":W&B" header) and wandb's own protobuf
`Record`, independently of persona-cli: the run's name is the run directory's, its config is
config.json's, the train log's steps are logged with their loss, the summary's figures are the
wandb summary, and the manifest holds the wandb run id.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.cli import app

wandb = pytest.importorskip("wandb", reason="the wandb extra is installed by .ci/run")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32 * 1024
HEADER = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every protobuf Record of a .wandb file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, records, pending = 7, [], b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_files(root: Path) -> dict[str, list[Any]]:
    """Records of each offline run under WANDB_DIR, by run id."""
    out = {}
    for f in root.rglob("run-*.wandb"):
        out[f.stem.removeprefix("run-")] = read_records(f)
    return out


def _value(item: Any) -> Any:
    return json.loads(item.value_json)


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@pytest.fixture
def wandb_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "wandb_files"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return root


def test_train_sft_and_eval_markers_write_offline_wandb_runs(
    prepared_home: Path, tmp_path: Path, wandb_dir: Path, cli
) -> None:
    chat = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A"}]}
        for i in range(6)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = tmp_path / "sft_run"
    args = ["train-sft", "--data", chat, "--model", "tiny-random", "--max-steps", "3"]
    args += ["--per-device-batch", "2", "--grad-accum", "1", "--lora-r", "4", "--max-length", "32"]
    res = cli.invoke(app, [str(a) for a in [*args, "--report-to", "wandb", "--out", train]])
    assert res.exit_code == 0, res.output
    evaluation = tmp_path / "eval_run"
    args = ["eval-markers", "--model", "tiny-random", "--personas-ids", "assistant,villain"]
    args += ["--samples", "1", "--max-new-tokens", "2", "--source", "villain"]
    res = cli.invoke(app, [str(a) for a in [*args, "--report-to", "wandb", "--out", evaluation]])
    assert res.exit_code == 0, res.output

    runs = run_files(wandb_dir)
    assert len(runs) == 2
    for run_dir in (train, evaluation):
        manifest = read_json(run_dir / "manifest.json")
        record = manifest["tracking"]
        assert record["backend"] == "wandb" and record["mode"] == "offline"
        records = runs[record["run_id"]]
        (run,) = [r.run for r in records if r.HasField("run")][:1]
        assert run.display_name == run_dir.name
        assert run.job_type == manifest["command"]
        config = {_key(i): _value(i) for i in run.config.update if _key(i) != "_wandb"}
        assert config == read_json(run_dir / "config.json")["config"]

    # The train log, step by step, with its loss.
    records = runs[read_json(train / "manifest.json")["tracking"]["run_id"]]
    history = [
        {_key(i): _value(i) for i in r.history.item} for r in records if r.HasField("history")
    ]
    logged = {h["_step"]: h["loss"] for h in history if "loss" in h}
    log = read_jsonl(train / "train_log.jsonl.gz")
    assert logged == {r["step"]: pytest.approx(r["loss"]) for r in log}
    assert read_json(train / "manifest.json")["tracking"]["steps_logged"] == 3
    # The summary's figures.
    records = runs[read_json(evaluation / "manifest.json")["tracking"]["run_id"]]
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({_key(i): _value(i) for i in r.summary.update})
    expected = read_json(evaluation / "summary.json")
    assert summary["source.rate"] == expected["source"]["rate"]
    assert summary["rates.assistant.n"] == expected["rates"]["assistant"]["n"]


def test_report_to_an_unknown_tracker_is_one_line(cli, tmp_path: Path) -> None:
    res = cli.invoke(app, ["proportions", "--row", "a:1/2:1/2", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["train-sft", "--report-to", "mlflow", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--report-to 'mlflow': choose one of none, wandb" in res.output
    assert not (tmp_path / "x").exists()
