"""eval-capability: batched letter log-probs equal a one-item-at-a-time loop; run contract."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import torch
from typer.testing import CliRunner

from persona_cli import bundled, capability, models
from persona_cli.artifacts import read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app


@pytest.fixture(scope="module")
def tiny(prepared_home: Path):
    resolved = models.resolve(models.TINY)
    return models.load_tokenizer(resolved), models.load_model(resolved, device="cpu")


def test_batched_scores_equal_unpadded_loop(tiny) -> None:
    tok, model = tiny
    items = capability.load_items(str(bundled.mcq_file()), limit=7)
    system = SystemPrompt.parse("none")
    report = inspect_template(tok)
    rows = capability.score_items(model, tok, items, system, report, batch_size=4)
    assert len({r["n_prompt_tokens"] for r in rows}) > 1  # lengths differ: padding is exercised
    for item, row in zip(items, rows, strict=True):
        prompt = render(
            tok,
            [{"role": "user", "content": capability.prompt_text(item)}],
            system,
            report,
            add_generation_prompt=True,
        )
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        for label in item.labels:
            (tid,) = tok.encode(label, add_special_tokens=False)
            assert row["label_logprobs"][label] == pytest.approx(float(logp[tid]), abs=1e-4)
        assert row["predicted"] == max(row["label_logprobs"], key=row["label_logprobs"].get)
        assert row["correct"] == (row["predicted"] == item.answer)


def test_cli_run_writes_rows_summary_and_manifest(prepared_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "cap"
    r = CliRunner().invoke(
        app, ["eval-capability", "--model", "tiny-random", "--limit", "12", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out / "capability.jsonl.gz")
    assert len(rows) == 12 and all(r["schema_version"] == 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == capability.summarize(rows)  # recomputable from the rows alone
    assert summary["accuracy"]["successes"] == sum(r["correct"] for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["items"]["sha256"]
    assert manifest["chat_template"]["system_prompt"]["mode"] == "none"
    assert manifest["model"]["spec"] == "tiny-random"
    again = CliRunner().invoke(
        app, ["eval-capability", "--model", "tiny-random", "--limit", "12", "--out", str(out)]
    )
    assert again.exit_code == 0 and "already finished" in again.stderr


def test_bad_item_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    good = {
        "id": "a",
        "question": "Q?",
        "choices": {"text": ["x", "y"], "label": ["A", "B"]},
        "answerKey": "A",
    }
    items = tmp_path / "items.jsonl"
    items.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps({**good, "answerKey": "C"}) + b"\n")
    out = tmp_path / "cap"
    r = CliRunner().invoke(
        app, ["eval-capability", "--model", "tiny-random", "--items", str(items), "--out", str(out)]
    )
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        f"error: {items}:2: answerKey 'C' is not one of the labels ['A', 'B']"
    )
    assert not out.exists()
