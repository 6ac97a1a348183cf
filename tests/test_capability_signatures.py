"""Capability signatures: MMLU-layout items, per-subject / per-class summaries, compare-items.

Every figure is recomputed here from the saved rows with pandas / statsmodels / scipy; the runs
compared are real eval-capability runs on tiny-random (base vs under a persona).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from persona_cli import capability
from persona_cli.artifacts import read_jsonl
from persona_cli.cli import app

MMLU = str(capability.mmlu_file())


def _eval(out: Path, *extra: str) -> Path:
    argv = ["eval-capability", "--model", "tiny-random", "--items", MMLU, "--out", str(out)]
    r = CliRunner().invoke(app, [*argv, *extra])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def runs(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from persona_cli import bundled

    root = tmp_path_factory.mktemp("capsig")
    data = root / "em.jsonl"
    data.write_text("\n".join(bundled.em_dataset_file().read_text().splitlines()[:4]) + "\n")
    for seed in (1, 2):  # a short, loud fine-tune per seed: it has to move the argmax letter
        argv = (
            f"train-sft --model tiny-random --data {data} --max-steps 2 --per-device-batch 2 "
            f"--grad-accum 1 --lr 0.05 --max-length 64 --seed {seed} --out {root}/sft_s{seed}"
        )
        r = CliRunner().invoke(
            app,
            argv.split(),
        )
        assert r.exit_code == 0, r.output
    return {
        "base": _eval(root / "base_0"),
        "base_again": _eval(root / "base_1"),
        "sft_1": _eval(root / "ft_1", "--adapter", str(root / "sft_s1")),
        "sft_2": _eval(root / "ft_2", "--adapter", str(root / "sft_s2")),
        "villain": _eval(root / "persona_0", "--persona", "villain"),
        "moral": _eval(root / "moral", "--subjects", "moral_scenarios"),
    }


def _compare(*argv: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["compare-items", *argv])
    return r.exit_code, r.stdout, r.stderr


def test_mmlu_rows_and_summary_match_pandas(runs: dict[str, Path]) -> None:
    rows = read_jsonl(runs["base"] / "capability.jsonl.gz")
    df = pd.DataFrame(rows)
    source = pd.read_json(MMLU, lines=True)
    assert len(df) == len(source) == 32
    assert list(df["subject"]) == list(source["subject"])
    assert list(df["gold_index"]) == list(source["answer"])
    assert list(df["answer"]) == ["ABCD"[i] for i in source["answer"]]
    summary = json.loads((runs["base"] / "summary.json").read_text())
    assert summary == capability.summarize(rows) and summary["schema_version"] == 2

    def check(entry: dict, group: pd.DataFrame) -> None:
        hits, n = int(group["correct"].sum()), len(group)
        low, high = proportion_confint(hits, n, alpha=0.05, method="wilson")
        acc = entry["accuracy"]
        assert entry["n"] == n and acc["successes"] == hits
        assert acc["rate"] == pytest.approx(hits / n)
        assert (acc["low"], acc["high"]) == pytest.approx((low, high))

    by_subject = df.groupby("subject")
    assert sorted(summary["per_subject"]) == sorted(by_subject.groups)
    for subject, group in by_subject:
        check(summary["per_subject"][subject], group)
        for label, cell in group.groupby("answer"):
            check(summary["per_subject"][subject]["per_class"][label], cell)
    for label, group in df.groupby("answer"):
        check(summary["per_class"][label], group)
    assert summary["macro_accuracy"]["subjects"] == pytest.approx(
        by_subject["correct"].mean().mean()
    )
    assert summary["macro_accuracy"]["classes"] == pytest.approx(
        df.groupby("answer")["correct"].mean().mean()
    )
    assert summary["micro_accuracy"] == pytest.approx(df["correct"].mean())
    assert set(summary["per_subject"]["moral_scenarios"]["per_class"]) == {"A", "B", "C", "D"}
    manifest = json.loads((runs["villain"] / "manifest.json").read_text())
    assert manifest["protocol"]["details"]["persona"] == "villain"
    assert manifest["chat_template"]["system_prompt"]["mode"] == "text"


def _correct(run: Path) -> np.ndarray:
    return np.array([r["correct"] for r in read_jsonl(run / "capability.jsonl.gz")])


def test_compare_items_flips_and_mcnemar(runs: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = _compare(str(runs["base"]), str(runs["villain"]))
    assert code == 3 and "system_prompt" in err
    out = tmp_path / "cmp"
    code, _, err = _compare(
        str(runs["base"]), str(runs["villain"]), "--allow-diff", "system_prompt"
    )
    assert code == 0, err
    code, stdout, err = _compare(str(runs["base"]), str(runs["sft_1"]), "--out", str(out), "--plot")
    assert code == 0, err
    assert "broken share" in stdout
    result = json.loads((out / "compare_items.json").read_text())
    assert (out / "compare_items.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a, b = _correct(runs["base"]), _correct(runs["sft_1"])
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    assert table[0][1] + table[1][0] > 0  # the fine-tune flips items: the test is not vacuous
    o = result["pairs"][0]["overall"]
    assert [[o["both"], o["a_only"]], [o["b_only"], o["neither"]]] == table
    assert o["a_only_share"] == pytest.approx(table[0][1] / (table[0][0] + table[0][1]))
    assert o["mcnemar_exact_p"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert o["delta"] == pytest.approx(b.mean() - a.mean())
    assert o["delta_low"] <= o["delta"] <= o["delta_high"]
    moral = result["pairs"][0]["groups"]["subject_class"]["moral_scenarios:D"]
    subj = np.array([r["subject"] for r in read_jsonl(runs["base"] / "capability.jsonl.gz")])
    gold = np.array([r["answer"] for r in read_jsonl(runs["base"] / "capability.jsonl.gz")])
    mask = (subj == "moral_scenarios") & (gold == "D")
    assert moral["n"] == int(mask.sum()) == 3
    assert moral["delta"] == pytest.approx(b[mask].mean() - a[mask].mean())


def test_hand_built_two_by_two() -> None:
    from persona_cli import paired

    # 5 both right, 3 broken, 1 fixed, 2 both wrong
    a = np.array([1] * 5 + [1] * 3 + [0] * 1 + [0] * 2, dtype=bool)
    b = np.array([1] * 5 + [0] * 3 + [1] * 1 + [0] * 2, dtype=bool)
    f = paired.flips(a, b)
    assert (f["both"], f["a_only"], f["b_only"], f["neither"]) == (5, 3, 1, 2)
    assert f["a_only_share"] == pytest.approx(3 / 8)
    # exact McNemar: two-sided binomial on the 4 discordant items, 1 of them one way
    assert f["mcnemar_exact_p"] == pytest.approx(scipy_stats.binomtest(1, 4, 0.5).pvalue)
    assert f["mcnemar_exact_p"] == pytest.approx(mcnemar([[5, 3], [1, 2]], exact=True).pvalue)
    assert f["b_only_share"] == pytest.approx(1 / 3)


def _outcomes(run: str, a: np.ndarray, classes: list[str], clusters: list[str] | None = None):
    from persona_cli.outcomes import KINDS, Outcomes

    keys = tuple(f"item{i}" for i in range(len(a)))
    return Outcomes(
        run=run,
        kind=KINDS["eval-capability"],
        definition="correct",
        keys=keys,
        values=np.asarray(a, dtype=bool),
        defined=np.ones(len(a), dtype=bool),
        clusters=tuple(clusters) if clusters else keys,
        groups={"class": tuple(classes)},
    )


def test_four_seed_per_class_summary_equals_scipy() -> None:
    """Four seeds, four classes of 10 items: side B's correct count per class is chosen so the
    per-seed class deltas are known; the across-seed mean, t-interval and sign count are
    checked against scipy."""
    from persona_cli import paired

    seeds = [256, 42, 7, 137]
    wanted = {  # per class: B - A in items (of 10), per seed in the order above
        "A": [1, 0, 2, -1],
        "B": [-3, -4, -2, -3],
        "C": [0, 0, 0, 0],
        "D": [2, 1, 1, 3],
    }
    classes = [c for c in "ABCD" for _ in range(10)]
    pairs = []
    for i, seed in enumerate(seeds):
        a = np.array([j % 10 < 5 for j in range(40)])  # A: 5 of 10 correct in every class
        b = np.concatenate([np.arange(10) < 5 + wanted[c][i] for c in "ABCD"])
        pair = paired.compare_pair(
            _outcomes(f"a{seed}", a, classes), _outcomes(f"b{seed}", b, classes), seed=i, n_boot=200
        )
        pairs.append(pair)
    across = paired.across_pairs(pairs, seeds, alpha=0.05)
    order = np.argsort(seeds)
    for c, deltas in wanted.items():
        values = np.array(deltas, dtype=float)[order] / 10
        s = across["groups"]["class"][c]
        assert s["seeds"] == sorted(seeds) and s["values"] == pytest.approx(values)
        assert s["mean"] == pytest.approx(values.mean())
        if values.std() > 0:
            low, high = scipy_stats.t.interval(
                0.95, len(values) - 1, loc=values.mean(), scale=scipy_stats.sem(values)
            )
            assert (s["low"], s["high"]) == pytest.approx((low, high))
        sign = np.sign(values.mean())
        assert s["n_agree_with_mean"] == (int(np.sum(np.sign(values) == sign)) if sign else 0)
    assert across["groups"]["class"]["B"]["n_agree_with_mean"] == 4  # 4/4 seeds agree
    assert across["groups"]["class"]["A"]["n_agree_with_mean"] == 2
    overall = np.array([sum(wanted[c][i] for c in "ABCD") / 40 for i in range(4)])[order]
    assert across["delta"]["mean"] == pytest.approx(overall.mean())


def test_cluster_bootstrap_equals_a_plain_loop() -> None:
    """The vectorised cluster bootstrap against a loop that concatenates the drawn clusters."""
    from persona_cli import paired

    gen = np.random.default_rng(5)
    clusters = [f"q{i % 7}" for i in range(60)]
    a, b = gen.random(60) < 0.4, gen.random(60) < 0.6
    got = paired.cluster_bootstrap(a, b, clusters, np.random.default_rng(11), 300)
    names = sorted(set(clusters))
    draws = np.random.default_rng(11).integers(0, len(names), size=(300, len(names)))
    for draw, value in zip(draws, got, strict=True):
        idx = [i for k in draw for i, c in enumerate(clusters) if c == names[k]]
        assert value == pytest.approx(b[idx].mean() - a[idx].mean())


def test_several_runs_per_side_summarised_across_pairs(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    root = runs["base"].parent
    code, _, err = _compare(
        str(root / "base_*"),
        str(root / "ft_*"),
        "--out",
        str(tmp_path / "cmp"),
        "--grouping",
        "class",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "cmp" / "compare_items.json").read_text())
    assert result["pairing"] == "order" and len(result["pairs"]) == 2
    gold = np.array([r["answer"] for r in read_jsonl(runs["base"] / "capability.jsonl.gz")])
    sides = [(runs["base"], runs["sft_1"]), (runs["base_again"], runs["sft_2"])]
    spread = 0
    for label in "ABCD":
        mask = gold == label
        deltas = [_correct(b)[mask].mean() - _correct(a)[mask].mean() for a, b in sides]
        s = result["across_pairs"]["groups"]["class"][label]
        assert s["values"] == pytest.approx(deltas)
        assert s["mean"] == pytest.approx(statistics.mean(deltas))
        if statistics.stdev(deltas) > 0:
            spread += 1
            low, high = scipy_stats.t.interval(
                0.95, 1, loc=statistics.mean(deltas), scale=scipy_stats.sem(deltas)
            )
            assert (s["low"], s["high"]) == pytest.approx((low, high))
        sign = np.sign(statistics.mean(deltas))
        assert s["n_agree_with_mean"] == (sum(np.sign(d) == sign for d in deltas) if sign else 0)
    assert spread > 0  # the t-interval was checked for at least one class


def test_different_item_sets_refused(runs: dict[str, Path]) -> None:
    code, _, err = _compare(str(runs["base"]), str(runs["moral"]))
    assert code == 3 and "item_set_sha256" in err
    # declared as the manipulation, the item sets still have to pair up item by item
    code, _, err = _compare(
        str(runs["base"]), str(runs["moral"]), "--allow-diff", "item_set_sha256"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "its items are not those of" in err and "20 only in A, 0 only in B" in err


def _items_file(tmp_path: Path, **changes: object) -> Path:
    good = {"question": "Q?", "subject": "s", "choices": ["x", "y", "z"], "answer": 1}
    bad = {k: v for k, v in {**good, **changes}.items() if v is not None}
    path = tmp_path / "items.jsonl"
    path.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps(bad) + b"\n")
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer": None}, "no gold answer (field 'answer')"),
        ({"answer": 3}, "answer index 3 is out of range for 3 choices"),
    ],
)
def test_bad_items_are_one_line(tmp_path: Path, changes: dict, message: str) -> None:
    items = _items_file(tmp_path, **changes)
    out = tmp_path / "cap"
    argv = ["eval-capability", "--model", "tiny-random", "--items", str(items), "--out", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {items}:2: {message}"
    assert not out.exists()


def test_unknown_subject_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "cap"
    argv = ["eval-capability", "--items", MMLU, "--subjects", "astrology", "--out", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--subjects 'astrology'" in r.stderr and not out.exists()
