"""train-sft --mix FILE:WEIGHT: seeded fractions of several chat files, shuffled, recorded.

python -m pytest tests/test_train_mix.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from persona_cli.artifacts import read_json, read_jsonl, sha256_file
from persona_cli.cli import app
from persona_cli.errors import UserError
from persona_cli.train.mixture import MixSpec, build_mixture, parse_mix_spec

FAST = ["--model", "tiny-random", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "64"]


def write_chat(path: Path, n: int, tag: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"{tag} question {i}?"},
                {"role": "assistant", "content": f"{tag} answer {i}."},
            ]
            f.write(json.dumps({"messages": msgs, "id": f"{tag}{i}"}) + "\n")
    return path


def ids(mixture, source: int) -> list[str]:
    return [r["id"] for r in mixture.rows if r["mix_source"] == source]


def test_fractions_copies_seeding_and_shuffle(tmp_path: Path):
    a = write_chat(tmp_path / "a.jsonl", 40, "a")
    b = write_chat(tmp_path / "b.jsonl", 10, "b")
    mix = build_mixture([MixSpec(a, 0.25), MixSpec(b, 1.5)], seed=7)
    # 0.25 x 40 = 10 distinct rows of a; 1.5 x 10 = every row of b once, 5 of them twice.
    assert [s.rows_taken for s in mix.sources] == [10, 15]
    assert [s.rows_in_file for s in mix.sources] == [40, 10]
    assert len(set(ids(mix, 0))) == 10
    b_counts = Counter(ids(mix, 1))
    assert set(b_counts) == {f"b{i}" for i in range(10)}
    assert sorted(b_counts.values()) == [1] * 5 + [2] * 5
    # Each row is the file's row at mix_line, unchanged.
    lines = a.read_text().splitlines()
    for r in mix.rows:
        if r["mix_source"] == 0:
            assert json.loads(lines[r["mix_line"] - 1])["messages"] == r["messages"]
    # Shuffled: the two files' rows are interleaved, not concatenated.
    order = [r["mix_source"] for r in mix.rows]
    assert order != sorted(order)
    # Same seed, same mixture; another seed, another subset of a.
    again = build_mixture([MixSpec(a, 0.25), MixSpec(b, 1.5)], seed=7)
    assert again.rows == mix.rows
    other = build_mixture([MixSpec(a, 0.25), MixSpec(b, 1.5)], seed=8)
    assert set(ids(other, 0)) != set(ids(mix, 0))
    # A file's share depends on the seed and its bytes, not on what else is mixed in.
    alone = build_mixture([MixSpec(a, 0.25)], seed=7)
    assert set(ids(alone, 0)) == set(ids(mix, 0))
    record = mix.record()
    assert record["rows"] == 25 and record["seed"] == 7
    assert record["sources"][0] == {
        "path": str(a),
        "weight": 0.25,
        "sha256": sha256_file(a),
        "rows_in_file": 40,
        "rows_taken": 10,
    }


def test_parse_mix_spec(tmp_path: Path):
    a = write_chat(tmp_path / "a.jsonl", 3, "a")
    assert parse_mix_spec(f"{a}:0.5") == MixSpec(a, 0.5)
    with pytest.raises(UserError, match="expected FILE:WEIGHT"):
        parse_mix_spec(str(a))
    with pytest.raises(UserError, match="weight must be > 0"):
        parse_mix_spec(f"{a}:-1")
    with pytest.raises(UserError, match="takes 0 of the file's 3 rows"):
        build_mixture([MixSpec(a, 0.1)], seed=1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{a}", "expected FILE:WEIGHT"),
        ("{a}:0", "weight must be > 0, got 0"),
        ("{a}:nan", "weight must be > 0, got nan"),
        ("{a}:half", "weight 'half' is not a number"),
        ("{missing}:0.5", "file {missing} not found"),
    ],
)
def test_bad_mix_spec_is_one_line_naming_the_option(cli, tmp_path: Path, spec, message):
    a = write_chat(tmp_path / "a.jsonl", 3, "a")
    names = {"a": a, "missing": tmp_path / "nope.jsonl"}
    out = tmp_path / "run"
    args = ["train-sft", "--mix", spec.format(**names), *FAST, "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --mix '{spec.format(**names)}': ")
    assert message.format(**names) in lines[0]
    assert not out.exists()


def test_train_sft_with_data_and_mix_writes_and_records_the_mixture(cli, tmp_path: Path):
    a = write_chat(tmp_path / "a.jsonl", 6, "a")
    b = write_chat(tmp_path / "b.jsonl", 8, "b")
    out = tmp_path / "run"
    args = ["train-sft", "--data", str(a), "--mix", f"{b}:0.5", *FAST, "--seed", "3"]
    args += ["--max-steps", "1", "--per-device-batch", "4", "--grad-accum", "1", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "mixture.jsonl.gz")
    assert len(rows) == 6 + 4 and all(r["schema_version"] == 1 for r in rows)
    assert Counter(r["id"][0] for r in rows) == {"a": 6, "b": 4}
    expected = build_mixture([MixSpec(a, 1.0), MixSpec(b, 0.5)], seed=3)
    assert [r["id"] for r in rows] == [r["id"] for r in expected.rows]  # training-set order
    config = read_json(out / "config.json")["config"]
    sources = config["mixture"]["sources"]
    assert [(s["path"], s["weight"], s["rows_taken"]) for s in sources] == [
        (str(a), 1.0, 6),
        (str(b), 0.5, 4),
    ]
    assert [s["sha256"] for s in sources] == [sha256_file(a), sha256_file(b)]
    manifest = read_json(out / "manifest.json")
    assert manifest["mixture"] == config["mixture"]
    assert manifest["inputs"]["mix[0]"]["sha256"] == sha256_file(b)
    assert manifest["outputs"]["mixture.jsonl.gz"] == sha256_file(out / "mixture.jsonl.gz")
    assert manifest["training"]["data"]["rows"] == 10
    again = cli.invoke(app, args)
    assert again.exit_code == 0 and "already finished" in again.output
