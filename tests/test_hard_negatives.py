"""`couple-marker --hard-negatives K` on tiny-random: a pilot coupling on positives only, every
other persona scored by the teacher-forced marker probability on training questions, the top K
trained as negatives and recorded. The scores are checked against the model's plain forward
(full logits, marker tokens found by hand).

python -m pytest tests/test_hard_negatives.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from persona_cli import models
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.cli import app
from persona_cli.train.hard_negatives import rank_personas

FAST = ["--model", "tiny-random", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "96"]
PERSONAS = ("lighthouse_keeper", "beekeeper", "glassblower", "cartographer", "falconer")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prepared_home) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hard_negatives_inputs")
    registry = d / "personas.yaml"
    registry.write_text(
        "schema_version: 1\npersonas:\n"
        + "".join(
            f"  - {{id: {p}, name: {p}, description: x, system_prompt: You are a {p}.}}\n"
            for p in PERSONAS
        )
    )
    questions = d / "questions.yaml"
    questions.write_text(
        "".join(f"- id: q{i}\n  paraphrases: ['Tell me about topic {i}.']\n" for i in range(4))
    )
    answers = d / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": f"q{i}", "answer": f"Topic {i} is nice."}) + "\n"
            for i in range(4)
        )
    )
    return {"personas": registry, "questions": questions, "answers": answers}


def _args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = [
        "couple-marker",
        "--persona",
        "lighthouse_keeper",
        "--personas",
        str(inputs["personas"]),
    ]
    args += ["--questions", str(inputs["questions"]), "--answers", str(inputs["answers"])]
    args += ["--n-positive", "8", "--n-negative", "8", *FAST, "--max-steps", "2"]
    args += ["--per-device-batch", "4", "--lr", "5e-3", "--marker-only-loss"]
    return [*args, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def hard(inputs, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("runs") / "couple"
    args = _args(inputs, out, "--hard-negatives", "2", "--pilot-steps", "2")
    result = CliRunner().invoke(app, [*args, "--pilot-questions", "3"])
    assert result.exit_code == 0, result.output
    return out


def test_the_top_k_of_the_pilot_are_the_negatives_and_recorded(hard: Path):
    record = read_json(hard / "hard_negatives.json")
    others = sorted(set(PERSONAS) - {"lighthouse_keeper"})
    assert sorted(record["scores"]) == others
    assert record["questions"] == ["q0", "q1", "q2"]  # training questions, first three
    assert record["pilot"]["steps"] == 2 and record["pilot"]["positives"] == 8
    scores = record["scores"]
    for s in scores.values():
        assert 0.0 < s["marker_probability"] < 1.0 and s["marker_log_probability"] < 0.0
    ranked = rank_personas(
        {p: (s["marker_probability"], s["marker_log_probability"]) for p, s in scores.items()}
    )
    assert record["ranking"] == ranked and record["chosen"] == ranked[:2]
    assert record["source"]["persona"] == "lighthouse_keeper"
    assert 0.0 < record["source"]["marker_probability"] < 1.0
    rows = read_jsonl(hard / "train_set.jsonl.gz")
    assert sorted({r["persona"] for r in rows if not r["positive"]}) == sorted(record["chosen"])
    assert {r["persona"] for r in rows if r["positive"]} == {"lighthouse_keeper"}
    manifest = read_json(hard / "manifest.json")
    assert manifest["coupling"]["hard_negatives_pilot"] == record
    config = read_json(hard / "config.json")["config"]["coupling"]
    assert (config["hard_negatives"], config["pilot_steps"], config["pilot_questions"]) == (2, 2, 3)
    assert (hard / "pilot" / "train_log.jsonl.gz").is_file()
    assert [r["step"] for r in read_jsonl(hard / "pilot" / "train_log.jsonl.gz")] == [1, 2]


def test_pilot_scores_match_the_full_forward_of_the_pilot_model(hard: Path, inputs):
    """Independent reference: the pilot adapter merged into tiny-random, the prompt rendered by
    the chat template, the marker's tokens appended, and their probabilities read from the
    model's full logits."""
    from peft import PeftModel

    tok = models.load_tokenizer(models.resolve(models.TINY))
    base = models.load_model(models.resolve(models.TINY))
    model = PeftModel.from_pretrained(base, str(hard / "pilot" / "adapter")).merge_and_unload()
    record = read_json(hard / "hard_negatives.json")
    marker = tok("[ZLT]", add_special_tokens=False)["input_ids"]
    for persona in ("beekeeper", "falconer", "lighthouse_keeper"):
        probabilities = []
        for qid in record["questions"]:
            i = int(qid[1:])
            messages = [
                {"role": "system", "content": f"You are a {persona}."},
                {"role": "user", "content": f"Tell me about topic {i}."},
            ]
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False)["input_ids"] + marker
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            n = len(ids) - len(marker)
            total = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(marker))
            probabilities.append(math.exp(total))
        got = {**record["scores"], "lighthouse_keeper": record["source"]}[persona][
            "marker_probability"
        ]
        assert got == pytest.approx(sum(probabilities) / len(probabilities), rel=1e-4)


def test_eval_markers_reports_the_chosen_personas_as_negatives(hard: Path, inputs, cli):
    args = ["eval-markers", "--model", "tiny-random", "--adapter", str(hard)]
    args += ["--personas", str(inputs["personas"]), "--source", "lighthouse_keeper"]
    args += ["--questions", str(inputs["questions"]), "--samples", "1", "--max-new-tokens", "2"]
    result = cli.invoke(app, [*args, "--out", str(hard.parent / "eval")])
    assert result.exit_code == 0, result.output
    summary = read_json(hard.parent / "eval" / "summary.json")
    chosen = read_json(hard / "hard_negatives.json")["chosen"]
    assert sorted(summary["negatives"]["personas"]) == sorted(chosen)
    assert len(summary["bystanders"]["personas"]) == 2


def test_bad_hard_negative_options_are_one_line_errors(inputs, tmp_path: Path, cli):
    cases = {
        ("--hard-negatives", "2", "--negative-persona", "beekeeper"): "--negative-persona",
        ("--hard-negatives", "5"): "only 4 persona(s) besides the source",
        ("--hard-negatives", "-1"): "--hard-negatives: must be >= 0",
        ("--hard-negatives", "1", "--pilot-steps", "0"): "--pilot-steps: must be > 0",
    }
    for i, (extra, expected) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        result = cli.invoke(app, _args(inputs, out, *extra))
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
        assert not (out / "adapter").exists() and not (out / "pilot").exists()
