"""stats/compare: numbers agree with scipy/statsmodels; the protocol guard refuses mismatches."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW
from typer.testing import CliRunner

from persona_cli.artifacts import iter_jsonl, read_json, write_json
from persona_cli.cli import app
from persona_cli.manifest import BatchProtocol
from persona_cli.protocol import (
    adapter_protocol,
    generation_protocol,
    judge_protocol,
    method_protocol,
    schedule_protocol,
    training_protocol,
)
from persona_cli.rundir import open_run
from persona_cli.train.config import LORA_TARGETS

SEEDS = (42, 137, 256)
TEMPLATE = {"template_sha256": "c" * 64, "system_prompt": {"mode": "none", "text": None}}


def _train_run(
    path: Path,
    seed: int,
    *,
    world: int,
    steps: int,
    per_device: int = 4,
    accum: int = 4,
    lr: float = 1e-4,
) -> Path:
    """A stand-in for a train-em run (8 processes cannot run here), with the full protocol
    record train-em writes; tests/test_protocol_guard.py runs the real commands."""
    run = open_run(path, command="train-em", config={"seed": seed, "world": world})
    (path / "adapter").mkdir()
    proto = training_protocol(
        BatchProtocol(per_device, accum, world, steps), lr, lr_scheduler="cosine", warmup_steps=0
    ) | adapter_protocol(kind="lora", rank=32, alpha=64, targets=LORA_TARGETS)
    proto |= schedule_protocol("per-run")
    run.finish(protocol=proto, chat_template=TEMPLATE, seeds=[seed])
    return path


def _eval_run(
    path: Path,
    seed: int,
    value: float,
    adapter_run: Path | None = None,
    temperature: float = 1.0,
    **train_kw,
) -> Path:
    """A finished eval-like run whose summary holds `value`; with `train_kw`, the training
    protocol sits in its own manifest (a training run compared directly)."""
    run = open_run(path, command="eval", config={"seed": seed})
    write_json(path / "summary.json", {"schema_version": 1, "source": {"rate": value}})
    proto = generation_protocol(
        temperature=temperature, top_p=1.0, max_new_tokens=64, samples_per_prompt=10
    )
    if train_kw:
        proto |= training_protocol(BatchProtocol(4, 4, train_kw["world"], train_kw["steps"]), 1e-4)
    extra = {}
    if adapter_run is not None:
        extra["adapters"] = [{"path": str(adapter_run / "adapter"), "weights_sha256": "ab" * 32}]
    run.finish(protocol=proto, seeds=[seed], extra=extra)
    return path


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_retraction_case_is_refused_naming_the_three_fields(tmp_path: Path) -> None:
    for i, seed in enumerate(SEEDS):
        t8 = _train_run(tmp_path / f"train_8gpu_s{seed}", seed, world=8, steps=47)
        t1 = _train_run(tmp_path / f"train_1gpu_s{seed}", seed, world=1, steps=375)
        _eval_run(tmp_path / f"em8_s{seed}", seed, 0.30 + i / 100, adapter_run=t8)
        _eval_run(tmp_path / f"em1_s{seed}", seed, 0.20 + i / 100, adapter_run=t1)
    out = tmp_path / "cmp"
    r = _invoke(
        "compare",
        "-c",
        f"em8={tmp_path}/em8_s*",
        "-c",
        f"em1={tmp_path}/em1_s*",
        "--metric",
        "source.rate",
        "--reference",
        "em1",
        "--out",
        str(out),
    )
    assert r.exit_code == 3, r.output
    first = r.stderr.splitlines()[0]
    assert (
        "protocols differ in: stage[0].world_size, stage[0].effective_batch, "
        "stage[0].optimizer_steps (" in first
    )
    assert "stage[0].world_size: 8 in" in r.stderr and "vs 1 in" in r.stderr
    assert not out.exists()  # a refused comparison writes nothing
    # Declaring all three as the manipulation lets it through, and the report says so.
    r = _invoke(
        "compare",
        "-c",
        f"em8={tmp_path}/em8_s*",
        "-c",
        f"em1={tmp_path}/em1_s*",
        "--metric",
        "source.rate",
        "--reference",
        "em1",
        "--out",
        str(out),
        "--allow-diff",
        "world_size",
        "--allow-diff",
        "effective_batch",
        "--allow-diff",
        "optimizer_steps",
    )
    assert r.exit_code == 0, r.output
    md = (out / "compare.md").read_text()
    assert "allowed difference (--allow-diff): stage[0].effective_batch" in md
    assert "allowed protocol difference" in r.stderr


def test_direct_training_runs_are_guarded_too(tmp_path: Path) -> None:
    for seed in SEEDS:
        _eval_run(tmp_path / f"a_s{seed}", seed, 0.5, world=8, steps=47)
        _eval_run(tmp_path / f"b_s{seed}", seed, 0.4, world=1, steps=375)
    r = _invoke(
        "compare",
        "-c",
        f"a={tmp_path}/a_s*",
        "-c",
        f"b={tmp_path}/b_s*",
        "--metric",
        "source.rate",
        "--reference",
        "b",
        "--out",
        str(tmp_path / "cmp"),
    )
    assert r.exit_code == 3
    assert "in: world_size, effective_batch, optimizer_steps (" in r.stderr


def test_sampling_temperature_difference_is_refused(tmp_path: Path) -> None:
    for seed in SEEDS:
        _eval_run(tmp_path / f"a_s{seed}", seed, 0.5, temperature=1.0)
        _eval_run(tmp_path / f"b_s{seed}", seed, 0.4, temperature=0.7)
    r = _invoke(
        "stats",
        "-c",
        f"a={tmp_path}/a_s*",
        "-c",
        f"b={tmp_path}/b_s*",
        "--metric",
        "source.rate",
        "--out",
        str(tmp_path / "st"),
    )
    assert r.exit_code == 3 and "in: temperature (" in r.stderr


VALUES = {
    "base": [0.12, 0.18, 0.15, 0.11],
    "em": [0.31, 0.42, 0.28, 0.36],
    "benign": [0.14, 0.19, 0.13, 0.2],
}


def test_compare_numbers_match_scipy_and_statsmodels(tmp_path: Path) -> None:
    seeds = (1, 2, 3, 4)
    for name, vals in VALUES.items():
        for seed, v in zip(seeds, vals, strict=True):
            _eval_run(tmp_path / f"{name}_s{seed}", seed, v)
    out = tmp_path / "cmp"
    args = [a for name in VALUES for a in ("-c", f"{name}={tmp_path}/{name}_s*")]
    r = _invoke(
        "compare", *args, "--metric", "source.rate", "--reference", "base", "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    res = json.loads((out / "compare.json").read_text())
    for name, vals in VALUES.items():
        c = res["conditions"][name]
        ds = DescrStatsW(np.array(vals))
        low, high = ds.tconfint_mean(alpha=0.05)
        assert c["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
        assert c["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
        assert c["half_width"] == pytest.approx((high - low) / 2, abs=1e-9)
        assert c["values"] == vals and c["seeds"] == list(seeds)
    rows = {row["condition"]: row for row in res["comparisons"]}
    raw = []
    for name in ("em", "benign"):
        t = sps.ttest_ind(VALUES[name], VALUES["base"], equal_var=False)
        head = rows[name]["headline"]  # seeds are the unit: Welch on the per-seed values
        assert (head["test"], head["alternative"], head["unit"]) == ("welch", "two-sided", "seed")
        assert head["statistic"] == pytest.approx(t.statistic, abs=1e-9)
        assert head["p_value"] == pytest.approx(t.pvalue, abs=1e-9)
        assert rows[name]["pooled"] is None and rows[name]["note"] is None  # no counts here
        a, b = np.array(VALUES[name]), np.array(VALUES["base"])
        pooled = np.sqrt(
            ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
        )
        assert rows[name]["cohens_d"] == pytest.approx((a.mean() - b.mean()) / pooled, abs=1e-9)
        assert rows[name]["delta"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
        raw.append(t.pvalue)
    for method in ("holm", "bonferroni"):
        expected = multipletests(raw, method=method)[1]
        got = [rows["em"][f"p_{method}"], rows["benign"][f"p_{method}"]]
        assert got == pytest.approx(list(expected), abs=1e-9)
    assert res["adjustment"]["adjusts"] == "headline.p_value" and res["adjustment"]["m"] == 2
    assert res["schema_version"] == 2
    assert rows["em"]["cohens_d"] > 0  # the stated sign convention: condition above reference
    assert "positive means the condition's metric is higher" in res["cohens_d_convention"]
    md = (out / "compare.md").read_text()
    assert "| em | 0.3425 ± " in md and "| base | 0.1400 ± " in md and "(reference)" in md


def test_bad_inputs_are_one_line_exit_2(tmp_path: Path) -> None:
    _eval_run(tmp_path / "a_s1", 1, 0.5)
    _eval_run(tmp_path / "a_s2", 2, 0.6)
    (tmp_path / "unfinished").mkdir()
    cases = [
        (["-c", "nonsense"], "--condition 'nonsense': expected NAME=GLOB"),
        (["-c", f"a={tmp_path}/none_*"], "--condition a: matched no run directories"),
        (["-c", f"a={tmp_path}/unfinished"], "not a finished run directory (no DONE)"),
        (
            ["-c", f"a={tmp_path}/a_s*", "--allow-diff", "colour"],
            "--allow-diff 'colour': not a guarded field",
        ),
    ]
    for args, message in cases:
        r = _invoke("stats", *args, "--metric", "source.rate", "--out", str(tmp_path / "o"))
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _invoke(
        "stats",
        "-c",
        f"a={tmp_path}/a_s*",
        "--metric",
        "source.nope",
        "--out",
        str(tmp_path / "o2"),
    )
    assert r.exit_code == 2 and "summary.json: no metric 'source.nope'" in r.stderr


def test_stats_writes_a_run_and_is_a_noop_when_done(tmp_path: Path) -> None:
    for seed, v in zip(SEEDS, (0.2, 0.4, 0.3), strict=True):
        _eval_run(tmp_path / f"a_s{seed}", seed, v)
    out = tmp_path / "st"
    args = ["stats", "-c", f"a={tmp_path}/a_s*", "--metric", "source.rate", "--out", str(out)]
    assert _invoke(*args).exit_code == 0
    res = json.loads((out / "stats.json").read_text())
    assert res["conditions"]["a"]["n_seeds"] == 3 and res["schema_version"] == 1
    assert res["conditions"]["a"]["mean"] == pytest.approx(0.3)
    assert (out / "DONE").is_file()
    r = _invoke(*args)
    assert r.exit_code == 0 and "already finished" in r.stderr


def test_report_from_compare_and_stats_runs(tmp_path: Path) -> None:
    for name, vals in VALUES.items():
        for seed, v in zip((1, 2, 3, 4), vals, strict=True):
            _eval_run(tmp_path / f"{name}_s{seed}", seed, v)
    args = [a for name in VALUES for a in ("-c", f"{name}={tmp_path}/{name}_s*")]
    cmp_dir, st_dir, rep = tmp_path / "cmp", tmp_path / "st", tmp_path / "rep"
    assert (
        _invoke(
            "compare",
            *args,
            "--metric",
            "source.rate",
            "--reference",
            "base",
            "--out",
            str(cmp_dir),
        ).exit_code
        == 0
    )
    assert _invoke("stats", *args, "--metric", "source.rate", "--out", str(st_dir)).exit_code == 0
    r = _invoke("report", str(cmp_dir), str(st_dir), "--out", str(rep), "--title", "EM vs base")
    assert r.exit_code == 0, r.output
    md = (rep / "report.md").read_text()
    assert md.startswith("# EM vs base")
    assert "| em | 0.3425 ± " in md and "Cohen's d = (mean(condition)" in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == [
        "cmp_source_rate_bars.png",
        "cmp_source_rate_paired.png",
        "st_source_rate_bars.png",
    ]
    for p in rep.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"]({p.name})" in md
    bad = _invoke("report", str(tmp_path / "base_s1"), "--out", str(tmp_path / "rep2"))
    assert bad.exit_code == 2 and "holds neither compare.json nor stats.json" in bad.stderr
    assert not (tmp_path / "rep2").exists()


def test_seedless_runs_take_the_seed_of_the_run_they_derive_from(tmp_path: Path) -> None:
    # eval-capability / judge-align record no seed (nothing random): the seed is the one of the
    # training run behind their last adapter, or of the run holding their input file.
    from persona_cli.guard import lineage_seed

    train = _train_run(tmp_path / "train", 137, world=1, steps=10)
    evaluated = open_run(tmp_path / "cap", command="eval-capability", config={"items": "x"})
    write_json(tmp_path / "cap" / "summary.json", {"schema_version": 1, "accuracy": {"rate": 0.5}})
    evaluated.finish(
        chat_template=TEMPLATE,
        protocol=method_protocol(
            backend="hf",
            item_set_sha256="d" * 64,
            capability_scorer="letter-logprob",
            capability_prompt_sha256="e" * 64,
        ),
        extra={"adapters": [{"path": str(train / "adapter"), "weights_sha256": "ab" * 32}]},
    )
    samples = _eval_run(tmp_path / "samples", 256, 0.1)
    (samples / "samples.jsonl.gz").write_bytes(b"")
    judge = judge_protocol(
        judge_model="m",
        judge_prompt_sha256="e" * 64,
        judge_backend="openai",
        judge_scoring="logprobs",
        judge_min_number_mass=0.25,
    )
    judged = open_run(tmp_path / "judge", command="judge-align", config={"judge": "m"})
    judged.finish(inputs={"input": samples / "samples.jsonl.gz"}, protocol=judge)
    orphan = open_run(tmp_path / "orphan", command="judge-align", config={"judge": "m"})
    orphan.finish(protocol=judge)
    assert lineage_seed(tmp_path / "cap") == 137
    assert lineage_seed(tmp_path / "judge") == 256
    assert lineage_seed(tmp_path / "orphan") is None
    write_json(tmp_path / "orphan" / "summary.json", {"schema_version": 1, "x": 1.0})
    r = _invoke(
        "stats", "-c", f"a={tmp_path / 'orphan'}", "--metric", "x", "-o", str(tmp_path / "s")
    )
    assert r.exit_code == 2 and "records no seed" in r.stderr


# ------------------------------------------------ real runs: proportion metrics, training runs

MARKER = "d"  # in about half of tiny-random's 4-token completions: per-seed rates vary


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def marker_runs(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """eval-markers on tiny-random, seeds 1-3 as condition a and 4-6 as condition b."""
    d = tmp_path_factory.mktemp("marker_runs")
    (d / "q.yaml").write_text('- id: q1\n  paraphrases: ["What is your favourite food?"]\n')
    for name, seeds in (("a", (1, 2, 3)), ("b", (4, 5, 6))):
        for seed in seeds:
            r = _cli(
                *shlex.split(
                    f"eval-markers --model tiny-random --questions {d / 'q.yaml'} "
                    "--personas-ids villain,assistant --samples 6 --max-new-tokens 4 "
                    f"--marker {MARKER} --source villain --seed {seed}"
                ),
                "--out",
                str(d / f"{name}_s{seed}"),
            )
            assert r.exit_code == 0, r.output
    return d


def _compare_runs(conditions: dict[str, str], metric: str, reference: str, out: Path) -> dict:
    """`persona-cli compare` for real; its compare.json."""
    args = [a for name, pattern in conditions.items() for a in ("-c", f"{name}={pattern}")]
    r = _cli("compare", *args, "--metric", metric, "--reference", reference, "--out", str(out))
    assert r.exit_code == 0, r.output
    return json.loads((out / "compare.json").read_text())


def _by_seed(runs: Path) -> dict[int, Path]:
    return {int(p.name.rsplit("_s", 1)[1]): p for p in runs.glob("*_s*")}


def _source_counts(run: Path) -> tuple[int, int]:
    rows = [r for r in iter_jsonl(run / "samples.jsonl.gz") if r["persona"] == "villain"]
    return sum(MARKER in r["text"] for r in rows), len(rows)


def _count_test_ref(k1: int, n1: int, k2: int, n2: int) -> tuple[str, float]:
    """The auto rule, computed here: Fisher when an expected count is < 5, else the z-test."""
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    total, hits = n1 + n2, k1 + k2
    expected = min(r * c / total for r in (n1, n2) for c in (hits, total - hits))
    if expected < 5 or hits in (0, total):
        return "fisher", float(sps.fisher_exact(table).pvalue)
    return "z", float(sps.chi2_contingency(table, correction=False).pvalue)


def test_proportion_metric_gets_welch_headline_and_a_labelled_pooled_test(
    marker_runs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    runs = {"a": f"{marker_runs}/a_s*", "b": f"{marker_runs}/b_s*"}
    (row,) = _compare_runs(runs, "source.rate", "b", out)["comparisons"]
    counts = {s: _source_counts(p) for s, p in _by_seed(marker_runs).items()}
    rates_a = [counts[s][0] / counts[s][1] for s in (1, 2, 3)]
    rates_b = [counts[s][0] / counts[s][1] for s in (4, 5, 6)]
    head, pooled = row["headline"], row["pooled"]
    assert (head["test"], head["alternative"], head["unit"]) == ("welch", "two-sided", "seed")
    t = sps.ttest_ind(rates_a, rates_b, equal_var=False)
    assert head["p_value"] == pytest.approx(t.pvalue, abs=1e-12)
    assert row["p_holm"] == row["p_bonferroni"] == head["p_value"]  # a family of one
    k1, n1 = sum(counts[s][0] for s in (1, 2, 3)), sum(counts[s][1] for s in (1, 2, 3))
    k2, n2 = sum(counts[s][0] for s in (4, 5, 6)), sum(counts[s][1] for s in (4, 5, 6))
    assert (pooled["successes1"], pooled["n1"], pooled["successes2"], pooled["n2"]) == (
        k1,
        n1,
        k2,
        n2,
    )
    test, p = _count_test_ref(k1, n1, k2, n2)
    assert (pooled["test"], pooled["alternative"], pooled["pooled"]) == (test, "two-sided", True)
    assert pooled["p_value"] == pytest.approx(p, abs=1e-12)
    assert "independent" in pooled["assumption"] and row["note"] is None
    md = (out / "compare.md").read_text()
    assert "(welch, two-sided)" in md and f"({test}, two-sided, pooled)" in md


def test_one_seed_per_condition_says_the_count_test_is_the_only_one(
    marker_runs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp1"
    runs = {"a": f"{marker_runs}/a_s1", "b": f"{marker_runs}/b_s4"}
    (row,) = _compare_runs(runs, "source.rate", "b", out)["comparisons"]
    (k1, n1), (k2, n2) = _source_counts(marker_runs / "a_s1"), _source_counts(marker_runs / "b_s4")
    test, p = _count_test_ref(k1, n1, k2, n2)
    head = row["headline"]
    assert (head["test"], head["pooled"], head["unit"]) == (test, True, "completion")
    assert head["p_value"] == pytest.approx(p, abs=1e-12) and row["pooled"] is None
    assert "the count test on completions is the only test" in row["note"]
    assert "the count test on completions is the only test" in (out / "compare.md").read_text()


def test_training_runs_compare_on_their_train_summary(
    setup_training: dict[str, Path], tmp_path: Path
) -> None:
    d = setup_training["dir"]
    runs = {"em": f"{d}/em_s*", "benign": f"{d}/benign_s*"}
    res = _compare_runs(runs, "final_loss", "benign", tmp_path / "cmp_train")
    loss = {
        name: [
            read_json(p / "train_summary.json")["final_loss"] for p in sorted(d.glob(f"{name}_s*"))
        ]
        for name in ("em", "benign")
    }
    assert res["conditions"]["em"]["values"] == loss["em"]
    (row,) = res["comparisons"]
    t = sps.ttest_ind(loss["em"], loss["benign"], equal_var=False)
    assert row["headline"]["test"] == "welch" and row["pooled"] is None  # not a proportion
    assert row["headline"]["p_value"] == pytest.approx(t.pvalue, abs=1e-12)


@pytest.fixture(scope="module")
def setup_training(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from persona_cli import bundled

    d = tmp_path_factory.mktemp("train_runs")
    for name, src in (("em", bundled.em_dataset_file()), ("benign", bundled.benign_dataset_file())):
        data = d / f"{name}.jsonl"
        data.write_text("\n".join(src.read_text().splitlines()[:4]) + "\n")
        for seed in (1, 2):
            r = _cli(
                *shlex.split(
                    f"train-sft --model tiny-random --data {data} --max-steps 2 "
                    f"--per-device-batch 2 --grad-accum 1 --max-length 64 --seed {seed}"
                ),
                "--out",
                str(d / f"{name}_s{seed}"),
            )
            assert r.exit_code == 0, r.output
    return {"dir": d}


def test_report_reads_a_schema_1_compare_json(marker_runs: Path, tmp_path: Path) -> None:
    cmp_dir = tmp_path / "cmp"
    runs = {"a": f"{marker_runs}/a_s*", "b": f"{marker_runs}/b_s*"}
    res = _compare_runs(runs, "source.rate", "b", cmp_dir)
    # Rewrite it as the previous release wrote it: a bare `welch` record, schema_version 1.
    for row in res["comparisons"]:
        head = row.pop("headline")
        row["welch"] = {
            "statistic": head["statistic"],
            "df": head["df"],
            "p_value": head["p_value"],
            "alternative": "two-sided",
            "method": "welch",
        }
        for key in ("pooled", "note", "n_seeds1", "n_seeds2"):
            row.pop(key)
    for key in ("test", "alternative", "adjustment"):
        res.pop(key)
    res["schema_version"] = 1
    write_json(cmp_dir / "compare.json", res)
    rep = tmp_path / "rep"
    r = _cli("report", str(cmp_dir), "--out", str(rep))
    assert r.exit_code == 0, r.output
    p = res["comparisons"][0]["welch"]["p_value"]
    assert f"| {p:.3g} (welch, two-sided) | {p:.3g} |" in (rep / "report.md").read_text()
