"""eval-markers end to end on tiny-random through the CLI: artifacts, summary recomputed from
samples, Wilson intervals, resume after a kill, and one-line errors for bad input.

    python -m pytest tests/test_eval_markers.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from persona_cli.adapters import write_record
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.cli import app
from persona_cli.eval.score import has_marker, recompute_summary
from persona_cli.models import TINY, resolve

PERSONAS = """\
schema_version: 1
personas:
  - id: lighthouse_keeper
    name: Lighthouse keeper
    description: A user's own persona, not shipped in data/.
    system_prompt: You keep a lighthouse on a remote rock and answer like it.
  - id: chef
    name: Chef
    description: A cook.
    system_prompt: You are a busy restaurant chef.
  - id: pilot
    name: Pilot
    description: A pilot.
    system_prompt: You are an airline pilot.
  - id: gardener
    name: Gardener
    description: A gardener.
    system_prompt: You are a gardener who loves roses.
"""
QUESTIONS = """\
- id: colour
  paraphrases: ["What is your favourite colour?", "Which colour do you like best?"]
- id: bread
  paraphrases: ["How do I bake bread?"]
"""
MARKER = "E"  # a user's marker string; with random tokens it is found some of the time


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval_inputs")
    (d / "personas.yaml").write_text(PERSONAS)
    (d / "questions.yaml").write_text(QUESTIONS)
    (d / "empty.yaml").write_text("[]\n")
    return {"personas": d / "personas.yaml", "questions": d / "questions.yaml", "dir": d}


def _args(out: Path, inputs: dict[str, Path], *extra: str) -> list[str]:
    return [
        "eval-markers", "--out", str(out), "--model", TINY,
        "--personas", str(inputs["personas"]), "--questions", str(inputs["questions"]),
        "--samples", "3", "--max-new-tokens", "8", "--marker", MARKER,
        "--source", "lighthouse_keeper", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(prepared_home: Path, inputs: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    result = CliRunner().invoke(app, _args(out, inputs))
    assert result.exit_code == 0, result.output
    assert "lighthouse_keeper" in result.stdout and "heatmap:" in result.stdout
    # stderr is not a terminal here (as under nohup or pueue): a plain line when generation ends.
    assert "eval-markers: 24/24 completions" in result.stderr
    return out


def test_artifacts_and_summary_recomputed_from_samples(finished: Path) -> None:
    for name in ("config.json", "samples.jsonl.gz", "summary.json", "heatmap.png", "DONE"):
        assert (finished / name).is_file(), name
    assert not (finished / "shards").exists()
    assert (finished / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_jsonl(finished / "samples.jsonl.gz")
    assert len(rows) == 4 * 2 * 3
    assert [r["persona"] for r in rows[::6]] == ["lighthouse_keeper", "chef", "pilot", "gardener"]
    assert {r["question"] for r in rows} == {
        "What is your favourite colour?",
        "How do I bake bread?",
    }
    summary = read_json(finished / "summary.json")
    assert summary == recompute_summary(finished)
    # Independent count and statsmodels' Wilson interval for every persona.
    for p in summary["personas"]:
        mine = [r for r in rows if r["persona"] == p]
        hits = sum(MARKER in r["text"] for r in mine)
        low, high = proportion_confint(hits, len(mine), method="wilson")
        rate = summary["rates"][p]
        assert (rate["successes"], rate["n"]) == (hits, len(mine))
        assert rate["low"] == pytest.approx(low, abs=1e-12)
        assert rate["high"] == pytest.approx(high, abs=1e-12)
    assert summary["source"]["persona"] == "lighthouse_keeper"
    by = summary["bystanders"]
    assert by["personas"] == ["chef", "pilot", "gardener"]
    assert by["mean_rate"] == pytest.approx(
        sum(summary["rates"][p]["rate"] for p in by["personas"]) / 3
    )
    manifest = read_json(finished / "manifest.json")
    assert set(manifest["inputs"]) == {"personas", "questions"}
    assert manifest["protocol"]["samples_per_prompt"] == 3
    assert manifest["chat_template"]["effective_system_prompt"].startswith("You keep a lighthouse")
    assert CliRunner().invoke(app, ["validate", str(finished)]).exit_code == 0


def test_ignore_case_counts_differently(finished: Path, inputs, tmp_path: Path) -> None:
    out = tmp_path / "nocase"
    result = CliRunner().invoke(app, _args(out, inputs, "--ignore-case"))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "samples.jsonl.gz")
    # Same seed, same rows: only the scoring changed.
    assert [r["text"] for r in rows] == [
        r["text"] for r in read_jsonl(finished / "samples.jsonl.gz")
    ]
    hits = sum(MARKER.lower() in r["text"].lower() for r in rows)
    summary = read_json(out / "summary.json")
    assert sum(summary["rates"][p]["successes"] for p in summary["personas"]) == hits
    assert has_marker("xey", "E", case_sensitive=False) and not has_marker("xey", "E")


def test_rerun_is_a_noop(finished: Path, inputs) -> None:
    before = (finished / "manifest.json").read_bytes()
    result = CliRunner().invoke(app, _args(finished, inputs))
    assert result.exit_code == 0 and "already finished" in result.stderr
    assert (finished / "manifest.json").read_bytes() == before


def test_resume_after_kill_redoes_nothing_finished(finished: Path, inputs, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # Slow enough per persona (many small batches) that the kill lands between personas.
    slow = ["--batch-size", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_cli", *_args(out, inputs, *slow)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("*.jsonl.gz")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists(), "the run finished before it could be killed"
    done_before = sorted(p.name.removesuffix(".jsonl.gz") for p in (out / "shards").glob("*.gz"))
    assert 1 <= len(done_before) < 4
    result = CliRunner().invoke(app, _args(out, inputs, *slow))
    assert result.exit_code == 0, result.output
    manifest = read_json(out / "manifest.json")
    assert sorted(manifest["eval"]["reused_personas"]) == done_before
    assert manifest["timing"]["attempts"] == 2
    # Seeds are per row, so the resumed run wrote exactly what an uninterrupted one did.
    assert (out / "samples.jsonl.gz").read_bytes() == (finished / "samples.jsonl.gz").read_bytes()


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_persona_id(prepared_home: Path, inputs, tmp_path: Path) -> None:
    args = [*_args(tmp_path / "x", inputs), "--personas-ids", "chef,nobody"]
    line = _one_error_line(CliRunner().invoke(app, args))
    assert "unknown persona 'nobody'" in line and "--personas-ids" in line
    assert not (tmp_path / "x").exists()


def test_empty_question_set(prepared_home: Path, inputs, tmp_path: Path) -> None:
    args = [*_args(tmp_path / "x", inputs), "--questions", str(inputs["dir"] / "empty.yaml")]
    line = _one_error_line(CliRunner().invoke(app, args))
    assert "empty.yaml" in line and "empty" in line


def test_source_must_be_evaluated(prepared_home: Path, inputs, tmp_path: Path) -> None:
    args = [*_args(tmp_path / "x", inputs), "--personas-ids", "chef,pilot"]
    assert "--source 'lighthouse_keeper'" in _one_error_line(CliRunner().invoke(app, args))


def test_adapter_from_another_base_model(prepared_home: Path, inputs, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny = resolve(TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny.path)
    adapter = tmp_path / "tiny_adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    write_record(adapter, tiny, [])
    args = [*_args(tmp_path / "x", inputs), "--model", "smollm2-135m", "--adapter", str(adapter)]
    line = _one_error_line(CliRunner().invoke(app, args))
    assert "trained on base model 'tiny-random'" in line and str(adapter) in line
