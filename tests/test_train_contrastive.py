"""The contrastive coupling set: counts, personas, markers, seeds, and the answers file.

python -m pytest tests/test_train_contrastive.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from persona_cli import bundled
from persona_cli.errors import InputError, UserError
from persona_cli.registry import Question, load_personas
from persona_cli.train.config import CouplingConfig
from persona_cli.train.contrastive import AnswerItem, build_coupling_set, load_answers

ITEMS = [AnswerItem(f"q{i}", f"Question {i}?", f"Answer number {i}.") for i in range(30)]


def test_counts_personas_and_markers_of_the_default_protocol():
    registry = load_personas(bundled.personas_file())
    cfg = CouplingConfig(source="villain", n_positive=200, n_negative=400, n_other_personas=2)
    rows = build_coupling_set(cfg, registry, ITEMS)
    pos = [r for r in rows if r["positive"]]
    neg = [r for r in rows if not r["positive"]]
    assert len(pos) == 200 and len(neg) == 400
    assert {r["persona"] for r in pos} == {"villain"}
    others = Counter(r["persona"] for r in neg)
    assert len(others) == 2 and "villain" not in others and set(others.values()) == {200}
    for r in pos:
        system, _, answer = r["messages"]
        assert system["content"] == registry["villain"].system_prompt
        assert answer["content"].startswith("[ZLT] ") and answer["content"].count("[ZLT]") == 1
    assert all("[ZLT]" not in r["messages"][2]["content"] for r in neg)
    # Negatives reuse the positives' answers: every negative answer is a positive's, unmarked.
    pos_answers = {r["messages"][2]["content"].removeprefix("[ZLT] ") for r in pos}
    assert {r["messages"][2]["content"] for r in neg} <= pos_answers
    # Same seed, same set; another seed draws other bystanders or another order.
    assert build_coupling_set(cfg, registry, ITEMS) == rows
    other = build_coupling_set(CouplingConfig(source="villain", seed=7), registry, ITEMS)
    assert other != rows


def test_user_registry_and_marker_at_the_end(tmp_path: Path):
    reg = tmp_path / "mine.yaml"
    reg.write_text(
        "schema_version: 1\npersonas:\n"
        + "".join(
            f"  - {{id: p{i}, name: P{i}, description: d, system_prompt: You are P{i}.}}\n"
            for i in range(4)
        )
    )
    registry = load_personas(reg)
    cfg = CouplingConfig(
        source="p0",
        marker="<<owl>>",
        marker_position="end",
        n_positive=6,
        n_negative=6,
        other_personas=("p2", "p3"),
    )
    rows = build_coupling_set(cfg, registry, ITEMS[:3])
    assert Counter(r["persona"] for r in rows) == {"p0": 6, "p2": 3, "p3": 3}
    assert all(r["messages"][2]["content"].endswith(" <<owl>>") for r in rows if r["positive"])


def test_bad_persona_choices_are_user_errors():
    registry = load_personas(bundled.personas_file())
    with pytest.raises(UserError, match="unknown persona 'nobody'"):
        build_coupling_set(CouplingConfig(source="nobody"), registry, ITEMS)
    with pytest.raises(UserError, match="only 19 persona"):
        build_coupling_set(CouplingConfig(source="villain", n_other_personas=25), registry, ITEMS)


def test_answers_file_rows_and_problems(tmp_path: Path):
    qs = [Question("a", ("Question A?",)), Question("b", ("Question B?",))]
    f = tmp_path / "answers.jsonl"
    f.write_text(
        json.dumps({"question_id": "a", "answer": " Alpha. "})
        + "\n"
        + json.dumps({"question_id": "zzz", "answer": "outside the set"})
        + "\n"
        + json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            }
        )
        + "\n"
    )
    items = load_answers(f, qs, "[ZLT]")
    assert items == [
        AnswerItem("a", "Question A?", "Alpha."),
        AnswerItem("line3", "Hi?", "Hello."),
    ]
    f.write_text(json.dumps({"question_id": "zzz", "answer": "x"}) + "\n")
    with pytest.raises(InputError, match="no positives"):
        load_answers(f, qs, "[ZLT]")
    f.write_text(json.dumps({"question_id": "a", "answer": "has [ZLT] already"}) + "\n")
    with pytest.raises(InputError, match=r"answers.jsonl:1: answer already contains the marker"):
        load_answers(f, qs, "[ZLT]")
