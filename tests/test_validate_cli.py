"""`persona-cli validate` end to end: one clear line and exit 2 for each kind of bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from persona_cli.bundled import data_dir
from persona_cli.cli import app

CHAT_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _write(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = orjson.dumps(CHAT_ROW)
    full = gzip.compress(b"".join(good + b"\n" for _ in range(3000)))
    (tmp / "truncated.jsonl.gz").write_bytes(full[: len(full) // 3])
    return {
        "truncated_gzip": (tmp / "truncated.jsonl.gz", ": truncated gzip stream"),
        "bad_json": (_write(tmp / "bad_json.jsonl", [good, b"{not json"]), ":2: invalid JSON"),
        "missing_messages": (
            _write(tmp / "missing.jsonl.gz", [good, good, b'{"prompt": "x"}']),
            ":3: missing field 'messages'",
        ),
        "wrong_role": (
            _write(
                tmp / "role.jsonl",
                [orjson.dumps({"messages": [{"role": "human", "content": "q"}]})],
            ),
            ":1: field 'messages' [0].role 'human' is not one of system, user, assistant",
        ),
    }


@pytest.mark.parametrize("case", ["truncated_gzip", "bad_json", "missing_messages", "wrong_role"])
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    path, expected = _bad_files(tmp_path)[case]
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(str(path))
    assert expected in lines[0]


def test_valid_files_pass_with_one_summary_line_each() -> None:
    files = [
        data_dir() / "personas.yaml",
        data_dir() / "questions" / "open_eval.yaml",
        data_dir() / "questions" / "coupling_train.yaml",
    ]
    result = CliRunner().invoke(app, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    out = result.stdout.strip().splitlines()
    assert len(out) == 3
    assert out[0].startswith("ok  ") and "(personas, " in out[0]
    assert "(questions, " in out[1]


def test_mixed_good_and_bad_exits_2_and_still_reports_good(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jsonl", [orjson.dumps(CHAT_ROW)])
    bad = _write(tmp_path / "bad.jsonl", [b"{"])
    result = CliRunner().invoke(app, ["validate", str(good), str(bad)])
    assert result.exit_code == 2
    assert "ok  " in result.stdout and str(good) in result.stdout
    assert result.stderr.startswith(f"{bad}:1: invalid JSON")


def test_unknown_kind_option_and_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", "--kind", "nope", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2
    (tmp_path / "x.jsonl").write_text("{}\n")
    result = CliRunner().invoke(app, ["validate", "--kind", "nope", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "--kind 'nope'" in result.stderr


def test_samples_schema_catches_drift(tmp_path: Path) -> None:
    row = {
        "schema_version": 1,
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
    ok = _write(tmp_path / "samples.jsonl.gz", [orjson.dumps(row)])
    assert CliRunner().invoke(app, ["validate", str(ok)]).exit_code == 0
    drift = _write(
        tmp_path / "samples_v2.jsonl.gz", [orjson.dumps({**row, "n_tokens": True, "extra": 1})]
    )
    result = CliRunner().invoke(app, ["validate", str(drift)])
    assert result.exit_code == 2
    assert "field 'n_tokens' must be int, got bool" in result.stderr
    assert "unknown field(s) 'extra'" in result.stderr


def test_persona_registry_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "personas.yaml"
    path.write_text(
        "schema_version: 1\npersonas:\n"
        "  - id: a\n    name: A\n    description: d\n    system_prompt: You are A.\n"
        "  - id: a\n    name: B\n    description: d\n    system_prompt: You are B.\n"
    )
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"{path}:7: personas[1]: duplicate id 'a'"


def test_artifact_kinds_by_name() -> None:
    from persona_cli.validate import artifact_kind

    names = {
        "samples.jsonl.gz": "samples",
        "step_000012.jsonl.gz": "step",
        "judgments.jsonl.gz": "judgments",
        "train_log.jsonl.gz": "train_log",
        "trace.jsonl.gz": None,
        "v_hack.safetensors": None,
        "heatmap.png": None,
    }
    for name, kind in names.items():
        assert artifact_kind(Path(name)) == kind, name
