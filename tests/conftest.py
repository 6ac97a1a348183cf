"""Shared fixtures. The whole session runs against a private PERSONA_CLI_HOME, offline.

`prepared_home` runs the real `persona-cli models prepare` once per session (about 30 s on two
cores: the GGUF conversion of the embedded model), so every test that needs a model sees the
same cache that command builds, and the user's own cache is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona_cli.cli import app


@pytest.fixture(scope="session", autouse=True)
def persona_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("persona_home")
    saved = {
        k: os.environ.get(k) for k in ("PERSONA_CLI_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    os.environ["PERSONA_CLI_HOME"] = str(home)
    # Prove everything works with no network: transformers must not try the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prepared_home(persona_home: Path) -> Path:
    result = CliRunner().invoke(app, ["models", "prepare"])
    assert result.exit_code == 0, result.output
    return persona_home


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()
