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
    for recipe in (
        "marker-demo",
        "dose-demo",
        "probe-demo",
        "probe-chain",
        "matrix-demo",
        "geometry-demo",
    ):
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
