"""dose-sweep on tiny-random: 2 arms x 3 doses x 2 seeds, killed mid-way and resumed; 2 arms x
2 doses x 3 seeds, whose per-dose headline test is Welch on the per-seed rates."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from persona_cli import bundled
from persona_cli.artifacts import iter_jsonl, read_json
from persona_cli.cli import app
from persona_cli.dose import plan as plan_lib
from persona_cli.dose.run import run_cells
from persona_cli.validate import validate_file

TRAIN_ARGS = "--per-device-batch 2 --grad-accum 1 --max-length 64"
WIDE = {"COLUMNS": "160"}  # printed tables unwrapped, so their cells can be searched


@pytest.fixture(scope="module")
def setup(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dose")
    for name, src in (("em", bundled.em_dataset_file()), ("benign", bundled.benign_dataset_file())):
        lines = src.read_text().splitlines()[:6]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (d / "q.yaml").write_text('- id: q1\n  paraphrases: ["What is your favourite food?"]\n')
    r = CliRunner().invoke(
        app,
        [
            "train-sft",
            "--model",
            "tiny-random",
            "--data",
            str(d / "em.jsonl"),
            "--max-steps",
            "1",
            *shlex.split(TRAIN_ARGS),
            "--out",
            str(d / "couple"),
        ],
    )
    assert r.exit_code == 0, r.output
    return {"dir": d, "couple": d / "couple"}


def _sweep_args(
    s: dict[str, Path], out: Path, doses: str = "1,2,3", seeds: str = "1,2", samples: int = 2
) -> list[str]:
    d = s["dir"]
    return [
        "dose-sweep",
        "run",
        "--coupling",
        str(s["couple"]),
        "--source",
        "villain",
        "--arm",
        f"em={d / 'em.jsonl'}",
        "--arm",
        f"benign={d / 'benign.jsonl'}",
        "--doses",
        doses,
        "--seeds",
        seeds,
        "--model",
        "tiny-random",
        "--train-args",
        TRAIN_ARGS,
        "--eval-args",
        f"--questions {d / 'q.yaml'} --personas-ids villain,assistant "
        f"--samples {samples} --max-new-tokens 4",
        "--out",
        str(out),
    ]


def _cells(out: Path) -> list[plan_lib.Cell]:
    config = plan_lib.SweepConfig.from_dict(read_json(out / "config.json")["config"])
    return plan_lib.plan(config, out)


def test_sweep_killed_midway_resumes_without_redoing_cells(setup, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    log = open(tmp_path / "sweep.log", "wb")  # noqa: SIM115 - read on failure below
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_cli", *_sweep_args(setup, out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen_running = False
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            pytest.fail("sweep ended before the kill:\n" + (tmp_path / "sweep.log").read_text())
        assert time.monotonic() < deadline
        if (out / "config.json").exists():
            states = [r["state"] for r in plan_lib.status(_cells(out))]
            seen_running |= "running" in states
            if states.count("done") >= 3:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen_running  # status saw a cell while its lock was held
    cells = _cells(out)
    assert len(cells) == 14  # per seed: the coupling adapter alone + 2 arms x 3 doses
    done_before = {c.name: (c.path / "eval" / "DONE").stat().st_mtime_ns for c in cells if c.done}
    assert 3 <= len(done_before) < 14
    status = CliRunner().invoke(app, ["dose-sweep", "status", str(out)])
    assert status.exit_code == 0 and f"done {len(done_before)}," in status.stdout
    assert "missing" in status.stdout and not (out / "DONE").exists()

    r = CliRunner().invoke(app, _sweep_args(setup, out))
    assert r.exit_code == 0, r.output
    cells = _cells(out)
    assert all(c.done for c in cells)
    for name, mtime in done_before.items():  # finished cells were not redone
        assert (out / "cells" / name / "eval" / "DONE").stat().st_mtime_ns == mtime
    assert (out / "DONE").is_file()
    png = out / "dose_response.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == [] and summary["n_done"] == 14
    assert len(summary["points"]) == 7 and len(summary["arm_tests"]) == 3
    for p in summary["points"]:  # pooled counts equal a plain count over the saved samples
        hits = n = 0
        for c in cells:
            if (c.arm, c.dose) == (p["arm"], p["dose"]):
                for row in iter_jsonl(c.path / "eval" / "samples.jsonl.gz"):
                    if row["persona"] == "villain":
                        n += 1
                        hits += "[ZLT]" in row["text"]
        assert (p["successes"], p["n"]) == (hits, n) and n == 4
        assert set(p["per_seed"]) == {"1", "2"} and p["seeds"]["n_seeds"] == 2
    again = CliRunner().invoke(app, _sweep_args(setup, out))
    assert again.exit_code == 0 and "already finished" in again.stderr
    # Summarising a finished sweep prints it and leaves the sealed files as the manifest says.
    printed = CliRunner().invoke(app, ["dose-sweep", "summarize", str(out)])
    assert printed.exit_code == 0 and "marker survival (14/14 cells done)" in printed.stdout
    report = validate_file(out)
    assert report.ok, report.problems[:5]


def _seed_rates(cells: list[plan_lib.Cell], arm: str, dose: int, marker: str):
    """Per-seed marker rates and pooled counts of the source persona, from the saved rows."""
    rates, hits_total, n_total = [], 0, 0
    for c in sorted(cells, key=lambda c: c.seed):
        if (c.arm, c.dose) != (arm, dose):
            continue
        rows = [
            r for r in iter_jsonl(c.path / "eval" / "samples.jsonl.gz") if r["persona"] == "villain"
        ]
        hits = sum(marker in r["text"] for r in rows)
        rates.append(hits / len(rows))
        hits_total, n_total = hits_total + hits, n_total + len(rows)
    return rates, (hits_total, n_total)


def test_three_seed_sweep_headline_is_welch_on_per_seed_rates(setup, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    # Marker "d": tiny-random's 4-token completions hold it about half the time, so per-seed
    # rates vary and the Welch test is defined.
    args = [*_sweep_args(setup, out, doses="1,2", seeds="1,2,3", samples=4), "--marker", "d"]
    r = CliRunner().invoke(app, [*args, "--test", "fisher", "--alternative", "greater"], env=WIDE)
    assert r.exit_code == 0, r.output
    cells = _cells(out)
    assert len(cells) == 15 and all(c.done for c in cells)
    assert read_json(out / "config.json")["config"]["summary"] == {
        "test": "fisher",
        "alternative": "greater",
    }
    summary = read_json(out / "summary.json")
    assert (summary["schema_version"], summary["test"], summary["alternative"]) == (
        2,
        "fisher",
        "greater",
    )
    assert [(t["dose"], t["arm1"], t["arm2"]) for t in summary["arm_tests"]] == [
        (1, "em", "benign"),
        (2, "em", "benign"),
    ]
    raw = []
    for t in summary["arm_tests"]:
        em, em_counts = _seed_rates(cells, "em", t["dose"], "d")
        benign, benign_counts = _seed_rates(cells, "benign", t["dose"], "d")
        head, pooled = t["headline"], t["pooled"]
        assert (head["test"], head["alternative"], head["unit"]) == ("welch", "greater", "seed")
        assert (t["n_seeds1"], t["n_seeds2"]) == (3, 3)
        ref = sps.ttest_ind(em, benign, equal_var=False, alternative="greater")
        if np.isnan(ref.pvalue):  # both arms constant across seeds
            assert head["p_value"] is None and "undefined" in t["note"]
        else:
            assert head["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)
            assert head["statistic"] == pytest.approx(ref.statistic, abs=1e-12)
            assert t["note"] is None
        raw.append(head["p_value"])
        assert (pooled["test"], pooled["alternative"], pooled["pooled"]) == (
            "fisher",
            "greater",
            True,
        )
        assert "independent" in pooled["assumption"]
        (k1, n1), (k2, n2) = em_counts, benign_counts
        assert (pooled["successes1"], pooled["n1"], pooled["successes2"], pooled["n2"]) == (
            k1,
            n1,
            k2,
            n2,
        )
        fisher = sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="greater")
        assert pooled["p_value"] == pytest.approx(fisher.pvalue, abs=1e-12)
    defined = [p for p in raw if p is not None]
    assert defined, "no dose had a defined Welch test: the check would be vacuous"
    for method in ("holm", "bonferroni"):
        expected = iter(multipletests(defined, method=method)[1])
        for t, p in zip(summary["arm_tests"], raw, strict=True):
            want = None if p is None else pytest.approx(next(expected), abs=1e-12)
            assert t[f"p_{method}"] == want
    assert summary["adjustment"]["m"] == len(defined)
    assert "welch, greater" in r.stdout and "fisher, greater, pooled" in r.stdout

    sealed = (out / "summary.json").read_bytes()
    printed = CliRunner().invoke(app, ["dose-sweep", "summarize", str(out)], env=WIDE)
    assert printed.exit_code == 0 and "welch, greater" in printed.stdout
    assert "recomputed" not in printed.stderr  # the sealed summary, as recorded
    other = CliRunner().invoke(
        app, ["dose-sweep", "summarize", str(out), "--alternative", "two-sided"], env=WIDE
    )
    assert other.exit_code == 0, other.output
    assert "welch, two-sided" in other.stdout and "fisher, two-sided, pooled" in other.stdout
    assert "recomputed from its cells and not written" in other.stderr
    assert (out / "summary.json").read_bytes() == sealed

    # The protocol guard across cells: the dose is the declared difference, nothing else.
    assert summary["protocol"] == {
        "dose_field": "stage[1].optimizer_steps",
        "allowed_differences": [],
        "cells_checked": 15,
    }
    # One cell re-evaluated by hand with another generation length: refused, naming it.
    cell = next(c for c in cells if (c.arm, c.dose, c.seed) == ("em", 2, 3))
    redo = CliRunner().invoke(app, [*cell.eval_argv, "--max-new-tokens", "3", "--force"])
    assert redo.exit_code == 0, redo.output
    again = ["dose-sweep", "summarize", str(out), "--alternative", "less"]
    refused = CliRunner().invoke(app, again, env=WIDE)
    assert refused.exit_code == 3, refused.output
    assert "protocols differ in: max_new_tokens (pass" in refused.output
    allowed = CliRunner().invoke(app, [*again, "--allow-diff", "max_new_tokens"], env=WIDE)
    assert allowed.exit_code == 0, allowed.output


def test_emit_pueue_queues_the_same_commands(setup, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    r = CliRunner().invoke(app, [*_sweep_args(setup, out, doses="5", seeds="7"), "--emit-pueue"])
    assert r.exit_code == 0, r.output
    script = r.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    queued = [
        shlex.split(line.split(" -- ", 1)[1].rstrip(")"))
        for line in script.splitlines()
        if " -- persona-cli " in line
    ]
    cells = _cells(out)
    expected = [["persona-cli", *c.train_argv] for c in cells if c.train_argv] + [
        ["persona-cli", *c.eval_argv] for c in cells
    ]
    assert sorted(map(tuple, queued[:-1])) == sorted(map(tuple, expected))
    assert queued[-1] == ["persona-cli", "dose-sweep", "summarize", str(out)]
    assert '--after "$t0"' in script and '--after "${after[@]}"' in script
    assert not any((c.path / "eval").exists() for c in cells)  # nothing was run


def test_gpus_fan_out_one_subprocess_per_device(setup, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = _sweep_args(setup, out, doses="1", seeds="3")
    args[args.index("--arm") : args.index("--arm") + 4] = ["--arm", args[args.index("--arm") + 1]]
    r = CliRunner().invoke(app, [*args, "--gpus", "0,1"])
    assert r.exit_code == 0, r.output
    devices = {
        read_json(c.path / "eval" / "manifest.json")["device"]["visible_devices"]
        for c in _cells(out)
    }
    assert devices == {"0", "1"}  # two adapter-set evaluations ran at once, one per device
    # Trainings log beside their run; each GPU's evaluation of its cells to the sweep.
    assert all((c.path / "train-sft.log").is_file() for c in _cells(out) if c.train_argv)
    assert {p.name for p in out.glob("eval-markers_gpu*.log")} == {
        "eval-markers_gpu0.log",
        "eval-markers_gpu1.log",
    }


def test_failing_training_is_reported_and_others_run(setup, tmp_path: Path) -> None:
    cells = [
        plan_lib.Cell("em", d, 1, tmp_path / f"c{d}", ("train-sft", str(d)), ("eval-markers",),
                      train_dir=tmp_path / f"c{d}" / "train")
        for d in (1, 2)
    ]  # fmt: skip
    calls = []

    def invoke(argv: tuple[str, ...], gpu: str | None) -> int:
        calls.append(argv)
        return 1 if argv == ("train-sft", "1") else 0

    outcomes = run_cells(
        cells, invoke, lambda members, k: ("eval-markers", *(c.name for c in members))
    )
    assert [(o.cell, o.ok, o.stage, o.exit_code) for o in outcomes] == [
        ("c1", False, "train", 1),
        ("c2", False, "eval", 1),  # evaluated (one invocation), but it wrote no DONE
    ]
    assert calls == [("train-sft", "1"), ("train-sft", "2"), ("eval-markers", "c2")]


def test_bad_sweep_options(setup, tmp_path: Path) -> None:
    base = _sweep_args(setup, tmp_path / "s")
    cases = [
        (["--doses", "1,x"], "--doses '1,x': expected comma-separated integers"),
        (["--arm", "nofile"], "--arm 'nofile': expected NAME=FILE"),
        (["--seeds", "1,1"], "--seeds: at least one, all distinct"),
    ]
    for extra, message in cases:
        r = CliRunner().invoke(app, [*base, *extra])
        assert r.exit_code == 2 and message in r.stderr, r.output
    r = CliRunner().invoke(app, ["dose-sweep", "status", str(tmp_path)])
    assert r.exit_code == 2 and "not a dose-sweep run directory" in r.stderr


def test_bad_input_in_a_cell_stops_the_sweep(setup, tmp_path: Path) -> None:
    args = _sweep_args(setup, tmp_path / "sweep", doses="1", seeds="1")
    args[args.index("--eval-args") + 1] += " --personas-ids nobody"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1
    # The cells are evaluated by one adapter-set invocation: refused once, for all three.
    assert r.stderr.count("unknown persona 'nobody'") == 1
    assert r.stderr.count("failed in eval (exit 2)") == 3


def test_one_run_schedule_uses_checkpoints_and_is_guarded(setup, tmp_path: Path) -> None:
    """--schedule one-run: one training per arm and seed, its adapters kept at the doses; the
    cells evaluate RUN@step_N through one adapter-set pass; compare refuses to put such a cell
    beside a per-dose cell (a different LR schedule), exit 3."""
    out = tmp_path / "sweep"
    args = [*_sweep_args(setup, out, doses="1,2", seeds="4"), "--schedule", "one-run"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cells = _cells(out)
    assert len(cells) == 5 and all(c.done for c in cells)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["benign_s4", "em_s4"]
    assert not any((c.path / "train").exists() for c in cells)  # no per-cell training
    run = out / "runs" / "em_s4"
    assert read_json(run / "train_summary.json")["checkpoints"] == [1, 2]
    assert read_json(run / "config.json")["config"]["train"]["save_at"] == [1, 2]
    # The step-2 checkpoint of a 2-step run holds the run's final adapter (an independent
    # check that the callback saved the weights of that step).
    from safetensors.torch import load_file

    last = load_file(run / "checkpoints" / "step_2" / "adapter_model.safetensors")
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in last)
    step1 = load_file(run / "checkpoints" / "step_1" / "adapter_model.safetensors")
    assert any(not (step1[k] == final[k]).all() for k in step1)
    em1 = next(c for c in cells if (c.arm, c.dose) == ("em", 1))
    manifest = read_json(em1.path / "eval" / "manifest.json")
    assert manifest["adapters"][1]["path"] == str(run / "checkpoints" / "step_1")
    assert manifest["adapters"][1]["checkpoint_step"] == 1
    from persona_cli.guard import protocol_of

    proto = protocol_of(em1.path / "eval")
    assert (proto["stage[1].optimizer_steps"], proto["stage[1].schedule"]) == (1, "one-run")
    assert read_json(out / "summary.json")["n_done"] == 5
    # The same cell under the per-dose protocol: train-sft for 1 step, then its evaluation.
    per_dose = plan_lib.plan(
        plan_lib.SweepConfig.from_dict(
            {**read_json(out / "config.json")["config"], "schedule": "per-dose"}
        ),
        tmp_path / "per_dose",
    )
    twin = next(c for c in per_dose if (c.arm, c.dose) == ("em", 1))
    for argv in (twin.train_argv, twin.eval_argv):
        assert CliRunner().invoke(app, list(argv)).exit_code == 0
    assert protocol_of(twin.path / "eval")["stage[1].schedule"] == "per-run"
    compare = [
        "compare",
        "-c",
        f"one-run={em1.path / 'eval'}",
        "-c",
        f"per-dose={twin.path / 'eval'}",
    ]
    compare += [
        "--metric",
        "source.rate",
        "--reference",
        "per-dose",
        "--out",
        str(tmp_path / "cmp"),
    ]
    refused = CliRunner().invoke(app, compare, env=WIDE)
    assert refused.exit_code == 3, refused.output
    assert "protocols differ in: stage[1].schedule (pass" in refused.output


def test_emit_slurm_array_one_cell_per_task(setup, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    script_path = tmp_path / "dose.sbatch"
    r = CliRunner().invoke(app, [*_sweep_args(setup, out, doses="1", seeds="5"),
                                 "--emit-slurm", str(script_path)])  # fmt: skip
    assert r.exit_code == 0, r.output
    script = script_path.read_text()
    cells = _cells(out)
    assert len(cells) == 3  # base, em and benign at dose 1
    assert f"#SBATCH --array=0-{len(cells) - 1}\n" in script
    assert subprocess.run(["bash", "-n", str(script_path)]).returncode == 0
    # One case per task, each running exactly its cell's commands.
    bodies = script.split('case "$task" in\n')[1].split("\n;;")[0]
    for i, c in enumerate(cells):
        body = script.split(f"\n{i})\n")[1].split("    ;;")[0]
        evals = [ln for ln in body.splitlines() if "eval-markers" in ln]
        assert len(evals) == 1 and shlex.join(c.eval_argv) in evals[0]
        trains = [ln for ln in body.splitlines() if "train-sft" in ln]
        assert len(trains) == (c.train_argv is not None)
        assert str(c.path / "eval" / "DONE") in body
    assert bodies  # the case statement is there
    base = next(i for i, c in enumerate(cells) if c.train_argv is None)
    exe = str(Path(sys.executable).parent / "persona-cli")

    def task(i: int, executable: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "PERSONA_CLI": executable}
        return subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True)

    ran = task(base, exe)  # the real command evaluates the cell
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert cells[base].done
    mtime = (cells[base].path / "eval" / "DONE").stat().st_mtime_ns
    again = task(base, "false")  # DONE: exits 0 at once, the executable is never called
    assert again.returncode == 0 and f"cell {cells[base].name}: done" in again.stdout
    assert (cells[base].path / "eval" / "DONE").stat().st_mtime_ns == mtime
    trained = next(i for i, c in enumerate(cells) if c.train_argv is not None)
    assert task(trained, "false").returncode != 0  # not DONE: its commands do run
    assert task(len(cells), exe).returncode == 2  # no such cell
