"""Top-level CLI behaviour: help lists real commands, version, doctor never leaks secrets."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from persona_cli import __version__
from persona_cli.cli import app


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "validate", "models"):
        assert command in result.stdout


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith(f"persona-cli {__version__}")


def test_doctor_reports_key_names_never_values(monkeypatch) -> None:
    secret = "sk-doctor-test-3b1f0c9e2a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0
    rep = json.loads(result.stdout)
    assert rep["api_keys"]["OPENAI_API_KEY"] is True
    assert rep["api_keys"]["ANTHROPIC_API_KEY"] is False
    assert rep["device"]["type"] in ("cpu", "cuda")
    table = CliRunner().invoke(app, ["doctor"])
    assert table.exit_code == 0
    assert secret not in result.output + table.output
    assert "OPENAI_API_KEY=set" in table.stdout


def test_console_script_entry_point_runs() -> None:
    # The installed entry point, as a user runs it, not just the Typer object.
    out = subprocess.run(
        [sys.executable, "-m", "persona_cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "validate" in out.stdout
