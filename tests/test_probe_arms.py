"""probe compare-arms on real runs (tiny-random): GRPO arms (vanilla vs projected, 2 seeds each)
and probe replay runs, the protocol guard, and the statistics against statsmodels and scipy.

Run: python -m pytest tests/test_probe_arms.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rl_helpers import SMALL, invoke, ok, one_error_line
from scipy.stats import ttest_ind
from statsmodels.stats.proportion import proportion_confint
from test_probe_pool import write_pool

from persona_cli import models
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.models import load_tokenizer, resolve
from persona_cli.probe.arms import ArmsJob, rl_summary
from persona_cli.schemas import STEP


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()  # busy shared cores: see tests/test_train_grpo.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def runs(persona_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    models.prepare([models.TINY])
    root = tmp_path_factory.mktemp("arms")
    pool = write_pool(root / "pool", load_tokenizer(resolve("tiny-random")))
    vhack = root / "vhack"
    ok("extract-vhack", "--pool", pool, "-m", "tiny-random", "--adapter", "lora",
       "--rank", 4, "--alpha", 8, "--out", vhack)  # fmt: skip
    out = {"root": root, "pool": pool, "vhack": vhack}
    code = ["--reward", "unit-tests", "--problem-ids", "count_vowels,chunk"]
    code += ["--num-generations", 2, "--per-device-batch", 4, "--max-steps", 2]
    for arm in ("off", "positive"):
        for seed in (1, 2):
            out[f"{arm}{seed}"] = root / f"{arm}_{seed}"
            ok("train-grpo", *SMALL, *code, "--seed", seed, "--adapter-init-seed", 42,
               "--vhack", vhack, "--project", arm, "--out", out[f"{arm}{seed}"])  # fmt: skip
    return out


def test_grpo_arms_trajectories_tests_and_plot(runs: dict[str, Path]) -> None:
    order = [runs["off1"], runs["positive1"], runs["off2"], runs["positive2"]]
    out = runs["root"] / "compare"
    result = ok("probe", "compare-arms", *order, "--arm-field", "projection", "--out", out)
    assert "compare-arms (projection; rl)" in result.output
    s = read_json(out / "summary.json")
    assert s["arms"] == {
        "off": [str(runs["off1"]), str(runs["off2"])],
        "positive": [str(runs["positive1"]), str(runs["positive2"])],
    }
    assert s["seeds"] == {"off": [1, 2], "positive": [1, 2]}
    for arm, points in s["trajectories"].items():
        assert [p["step"] for p in points] == [1, 2]
        for p in points:  # recounted from the raw rows: the policy's own completions
            hacks = n = 0
            for seed in (1, 2):
                rows = read_jsonl(
                    runs[f"{arm}{seed}"] / f"step_{p['step']:06d}.jsonl.gz", STEP.check
                )
                hacks += sum(r["category_strict"] == "hack" for r in rows)
                n += len(rows)
            assert (p["hacks"], p["completions"], p["seeds"]) == (hacks, n, 2)
            low, high = proportion_confint(hacks, n, alpha=0.05, method="wilson")
            assert p["low"] == pytest.approx(max(low, 0.0), abs=1e-12)
            assert p["high"] == pytest.approx(high, abs=1e-12)
    (c,) = s["comparisons"]  # default: the last step every run has, arm vs the first arm
    assert (c["step"], c["arm"], c["reference"]) == (2, "positive", "off")
    assert c["n_seeds1"] == c["n_seeds2"] == 2 and c["headline"]["test"] == "welch"
    png = (out / "arms.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert read_json(out / "manifest.json")["protocol"]["details"]["arm_field"] == "projection"
    assert (out / "DONE").is_file()


def test_rl_summary_statistics_against_scipy_and_statsmodels() -> None:
    # Per-run trajectory rows as rl_trajectory writes them, with hacks this time.
    counts = {("a", 1): (3, 8), ("a", 2): (5, 8), ("a", 3): (4, 8)}
    counts |= {("b", 1): (1, 8), ("b", 2): (0, 8), ("b", 3): (2, 8)}
    rows = [
        {"run": f"{arm}{seed}", "arm": arm, "seed": seed, "step": 1, "hacks": h,
         "completions": n, "gt_pass": 0, "proj_cos_in": None, "proj_cos_out": None}
        for (arm, seed), (h, n) in counts.items()
    ]  # fmt: skip
    s = rl_summary(rows, ["a", "b"], ArmsJob(runs=("x", "y")))
    (point,) = s["trajectories"]["a"]
    low, high = proportion_confint(12, 24, alpha=0.05, method="wilson")
    assert (point["hacks"], point["completions"]) == (12, 24)
    assert (point["low"], point["high"]) == pytest.approx((low, high))
    (c,) = s["comparisons"]
    b_rates, a_rates = [1 / 8, 0, 2 / 8], [3 / 8, 5 / 8, 4 / 8]
    ref = ttest_ind(b_rates, a_rates, equal_var=False)
    assert c["headline"]["p_value"] == pytest.approx(ref.pvalue)
    assert c["diff"] == pytest.approx(np.mean(b_rates) - np.mean(a_rates))
    assert c["pooled"]["p_value"] is not None  # the pooled count test reported beside it


def test_replay_runs_give_cosine_trajectories(runs: dict[str, Path]) -> None:
    root = runs["root"]
    base = ("probe", "replay", "--pool", runs["pool"], "--vhack", runs["vhack"], "--lr", "1e-2")
    ok(*base, "--max-steps", 2, "--out", root / "vanilla")
    ok(*base, "--max-steps", 2, "--projected", "--out", root / "projected")
    out = root / "replay_compare"
    ok("probe", "compare-arms", root / "vanilla", root / "projected", "--out", out)
    s = read_json(out / "summary.json")
    assert s["kind"] == "replay" and s["comparisons"] == []
    for arm, run in (("off", "vanilla"), ("positive", "projected")):
        steps = read_json(root / run / "summary.json")["steps"]
        got = s["trajectories"][arm]
        assert [p["step"] for p in got] == [st["step"] for st in steps]
        for p, st in zip(got, steps, strict=True):
            for key in ("mean_cos", "mean_cos_in", "mean_cos_out", "frac_fired"):
                assert p[key] == pytest.approx(st[key])
    assert (out / "arms.png").stat().st_size > 10_000


def test_mismatched_protocols_are_refused(runs: dict[str, Path]) -> None:
    root = runs["root"]
    other = root / "mc"
    ok("train-grpo", *SMALL, "--reward", "mc", "--max-steps", 1, "--vhack", runs["vhack"],
       "--project", "positive", "--out", other)  # fmt: skip
    result = invoke("probe", "compare-arms", runs["off1"], other, "--out", root / "refused")
    assert result.exit_code == 3, result.output  # the guard's line, then one line per field
    first, *fields = result.stderr.strip().splitlines()
    assert first.startswith("error: refusing to compare") and "rl_reward" in first
    assert any(f.strip().startswith("optimizer_steps: 2 in") for f in fields)
    result = invoke("probe", "compare-arms", runs["off1"], runs["off2"], "--out", root / "one")
    one_error_line(result, "every run has projection=off")
    result = invoke("probe", "compare-arms", runs["off1"], runs["positive1"],
                    "--arm-field", "no_such_field", "--out", root / "bad")  # fmt: skip
    one_error_line(result, "--allow-diff 'no_such_field'")
    assert not (root / "refused").exists() and not (root / "one").exists()
