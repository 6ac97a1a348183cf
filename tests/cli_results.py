"""Helpers for tests that drive the CLI: a call that must succeed, and one that must fail with
exactly one `error: ...` line."""

from __future__ import annotations

from typer.testing import CliRunner

from persona_cli.cli import app


def invoke_ok(args: list[str]) -> object:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output + result.stderr, result.exception)
    return result


def one_error_line(args: list[str], code: int = 2) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
