"""The justfile's chain mechanics with the real `just` (rust-just, a dev dependency): every recipe
file parses, and a stage runs unless its run directory has DONE, which is what lets a crashed
overnight chain resume without redoing finished stages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# rust-just is a dev dependency: the one beside this interpreter, else one on PATH.
JUST = shutil.which("just", path=str(Path(sys.executable).parent)) or shutil.which("just") or "just"


def _just(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(JUST), "--justfile", str(ROOT / "justfile"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_every_demo_recipe_is_listed() -> None:
    result = _just("--list")
    assert result.returncode == 0, result.stderr
    demos = ("marker-quick", "marker-demo", "dose-demo", "probe-demo", "probe-chain")
    for recipe in (*demos, "matrix-demo", "geometry-demo"):
        assert f"    {recipe}" in result.stdout


def test_a_stage_runs_once_and_is_skipped_after_done(tmp_path: Path) -> None:
    run = tmp_path / "stage"
    run.mkdir()
    command = f"bash -c 'echo x >> {run}/ran'"
    first = _just("_stage", str(run), command)
    assert first.returncode == 0, first.stderr
    assert (run / "ran").read_text() == "x\n"
    (run / "DONE").write_text("")
    second = _just("_stage", str(run), command)
    assert second.returncode == 0 and f"skip: {run} is finished (DONE)" in second.stdout
    assert (run / "ran").read_text() == "x\n"  # not run again
    always = _just("_stage", str(run), command, "never")
    assert always.returncode == 0 and (run / "ran").read_text() == "x\nx\n"


def test_a_failing_stage_stops_the_chain(tmp_path: Path) -> None:
    result = _just("_stage", str(tmp_path / "failing"), "false")
    assert result.returncode != 0


def test_dose_demo_queues_the_sweep_on_the_marker_demo_coupling() -> None:
    result = _just("--dry-run", "dose-demo")
    assert result.returncode == 0, result.stderr
    sweep = [line for line in result.stderr.splitlines() if "dose-sweep run" in line]
    assert len(sweep) == 1
    assert "--coupling runs/marker-demo/couple" in sweep[0]
    assert "--personas-ids velmari_scholar" in sweep[0]


def test_marker_quick_and_marker_demo_run_the_same_chain_with_their_own_settings() -> None:
    quick = _just("--dry-run", "marker-quick")
    assert quick.returncode == 0, quick.stderr
    couple = [line for line in quick.stderr.splitlines() if "couple-marker" in line]
    assert len(couple) == 1 and "--hard-negatives 2" in couple[0]
    assert "--negative-persona" not in couple[0]
    evals = [line for line in quick.stderr.splitlines() if "eval-markers" in line]
    assert len(evals) == 4 and all("open_eval_quick.yaml" in line for line in evals)
    assert 'out="runs/marker-quick"' in quick.stderr
    demo = _just("--dry-run", "marker-demo")
    assert demo.returncode == 0, demo.stderr
    couple = [line for line in demo.stderr.splitlines() if "couple-marker" in line]
    assert len(couple) == 1
    assert "--negative-persona medieval_knight --negative-persona pirate" in couple[0]
    assert 'out="runs/marker-demo"' in demo.stderr and "open_eval_quick" not in demo.stderr
