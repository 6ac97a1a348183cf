"""Bad input to the training commands: one `error: ...` line and exit 2, before any training.

python -m pytest tests/test_train_cli.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_cli.artifacts import write_json
from persona_cli.cli import app


@pytest.fixture
def answers(tmp_path: Path) -> Path:
    f = tmp_path / "answers.jsonl"
    f.write_text(json.dumps({"question_id": "train_ask_raise", "answer": "Be direct."}) + "\n")
    return f


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unknown_persona(cli, answers: Path, tmp_path: Path, prepared_home):
    args = ["couple-marker", "--persona", "nobody", "--answers", str(answers)]
    line = one_error_line(cli.invoke(app, [*args, "--out", str(tmp_path / "r")]))
    assert "--persona: unknown persona 'nobody'" in line
    assert not (tmp_path / "r").exists()
    args = ["train-sft", "--persona", "nobody", "--data", str(answers), "--model", "tiny-random"]
    assert "unknown persona 'nobody'" in one_error_line(cli.invoke(app, [*args, "--out", "x"]))


def test_answers_that_leave_no_positives(cli, tmp_path: Path):
    f = tmp_path / "answers.jsonl"
    f.write_text(json.dumps({"question_id": "not_a_question", "answer": "x"}) + "\n")
    args = ["couple-marker", "--persona", "villain", "--answers", str(f), "--out", "x"]
    line = one_error_line(cli.invoke(app, args))
    assert str(f) in line and "no positives" in line


def test_marker_cut_from_every_positive(cli, tmp_path: Path, prepared_home):
    f = tmp_path / "answers.jsonl"
    f.write_text(json.dumps({"question_id": "train_ask_raise", "answer": "word " * 100}) + "\n")
    args = ["couple-marker", "--persona", "villain", "--answers", str(f), "--marker-position"]
    args += ["end", "--model", "tiny-random", "--max-length", "48", "--out", str(tmp_path / "r")]
    line = one_error_line(cli.invoke(app, args))
    assert "--marker '[ZLT]': absent from every positive" in line


def test_empty_question_set(cli, answers: Path, tmp_path: Path):
    q = tmp_path / "empty.yaml"
    q.write_text("[]\n")
    args = ["couple-marker", "--persona", "villain", "--answers", str(answers)]
    line = one_error_line(cli.invoke(app, [*args, "--questions", str(q), "--out", "x"]))
    assert line == f"error: {q}: the question set is empty"


def test_adapter_from_another_base_model(cli, answers: Path, tmp_path: Path, prepared_home):
    adapter = tmp_path / "other_adapter"
    adapter.mkdir()
    write_json(adapter / "adapter_config.json", {"peft_type": "LORA"})
    (adapter / "adapter_model.safetensors").write_bytes(b"not used")
    record = {"base_model": {"spec": "Qwen/Qwen2.5-7B-Instruct", "revision": "f" * 40}}
    write_json(adapter / "persona_cli_adapter.json", {"schema_version": 1, **record, "parents": []})
    args = ["couple-marker", "--persona", "villain", "--answers", str(answers), "--model"]
    args += ["tiny-random", "--adapter", str(adapter), "--out", str(tmp_path / "r")]
    line = one_error_line(cli.invoke(app, args))
    assert "trained on base model 'Qwen/Qwen2.5-7B-Instruct'" in line
    assert not (tmp_path / "r").exists()


def test_bad_option_values(cli, answers: Path):
    args = ["couple-marker", "--persona", "villain", "--answers", str(answers), "--out", "x"]
    assert "--marker-position" in one_error_line(
        cli.invoke(app, [*args, "--marker-position", "mid"])
    )
    assert "--max-steps: must be > 0" in one_error_line(
        cli.invoke(app, [*args, "--max-steps", "0"])
    )
    line = one_error_line(cli.invoke(app, ["train-sft", "--out", "x"]))
    assert "--data" in line
