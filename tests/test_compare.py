"""stats/compare: numbers agree with scipy/statsmodels; the protocol guard refuses mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import DescrStatsW
from typer.testing import CliRunner

from persona_cli.artifacts import write_json
from persona_cli.cli import app
from persona_cli.manifest import BatchProtocol
from persona_cli.protocol import generation_protocol, training_protocol
from persona_cli.rundir import open_run

SEEDS = (42, 137, 256)


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
    run = open_run(path, command="train-em", config={"seed": seed, "world": world})
    (path / "adapter").mkdir()
    proto = training_protocol(BatchProtocol(per_device, accum, world, steps), lr)
    run.finish(protocol=proto, seeds=[seed])
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
        assert rows[name]["welch"]["statistic"] == pytest.approx(t.statistic, abs=1e-9)
        assert rows[name]["welch"]["p_value"] == pytest.approx(t.pvalue, abs=1e-9)
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
    from persona_cli.protocol import lineage_seed

    train = _train_run(tmp_path / "train", 137, world=1, steps=10)
    evaluated = open_run(tmp_path / "cap", command="eval-capability", config={"items": "x"})
    write_json(tmp_path / "cap" / "summary.json", {"schema_version": 1, "accuracy": {"rate": 0.5}})
    evaluated.finish(
        extra={"adapters": [{"path": str(train / "adapter"), "weights_sha256": "ab" * 32}]}
    )
    samples = _eval_run(tmp_path / "samples", 256, 0.1)
    (samples / "samples.jsonl.gz").write_bytes(b"")
    judged = open_run(tmp_path / "judge", command="judge-align", config={"judge": "m"})
    judged.finish(inputs={"input": samples / "samples.jsonl.gz"})
    orphan = open_run(tmp_path / "orphan", command="judge-align", config={"judge": "m"})
    orphan.finish()
    assert lineage_seed(tmp_path / "cap") == 137
    assert lineage_seed(tmp_path / "judge") == 256
    assert lineage_seed(tmp_path / "orphan") is None
    write_json(tmp_path / "orphan" / "summary.json", {"schema_version": 1, "x": 1.0})
    r = _invoke(
        "stats", "-c", f"a={tmp_path / 'orphan'}", "--metric", "x", "-o", str(tmp_path / "s")
    )
    assert r.exit_code == 2 and "records no seed" in r.stderr
