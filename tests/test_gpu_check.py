"""benchmarks/gpu_check.py --tiny: the GPU acceptance script runs every stage on a CPU, so it
cannot rot while no GPU is at hand.

The real script runs as a subprocess, as on a GPU machine: first `--save-tokenizer` (what travels
to a machine without gguf), then `--tiny --tokenizer DIR`. Its rows are checked for presence and
finiteness, the cosine paths for agreement, and the MFU rows against FLOPs recomputed here from
the model shape alone (not from the module walk the script does). A stage made to fail through
the real training path's own validation must give a non-zero exit and one line.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona_cli import models
from persona_cli.artifacts import read_json
from persona_cli.train.config import LORA_TARGETS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
METRICS = {
    "build:tiny": ["parameters"],
    "sft:tiny": ["tokens_per_s", "positions_per_s", "seconds_per_step", "mfu_6nt", "mfu_lora"],
    "cosine:tiny": [
        "vectorised_s",
        "loop_s",
        "loop_over_vectorised",
        "vectorised_over_plain",
        "max_abs_cos_diff",
    ],
    "eval:tiny": [
        "completions_per_s_batched",
        "completions_per_s_single",
        "batched_over_single",
        "generated_tokens_per_s_batched",
    ],
}


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    # The session's private PERSONA_CLI_HOME and offline HF variables come with os.environ. One
    # torch thread: on 2 shared cores two threads stall each other (3x slower under load), and
    # the smoke run's figures are not speed measurements.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_random(persona_home: Path) -> Path:
    return models.prepare([models.TINY])[0]


@pytest.fixture(scope="module")
def tiny_run(tiny_random: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    saved = run_script("--save-tokenizer", str(tmp / "tokenizer"))
    assert saved.returncode == 0, saved.stderr
    assert (tmp / "tokenizer" / "tokenizer.json").is_file()
    proc = run_script("--tiny", "--tokenizer", str(tmp / "tokenizer"), "--out", str(tmp / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "json": read_json(tmp / "out" / "gpu_check.json"),
        "md": (tmp / "out" / "gpu_check.md").read_text(),
        "stdout": proc.stdout,
    }


def rows_of(result: dict) -> dict[tuple[str, str], dict]:
    return {(r["stage"], r["metric"]): r for r in result["rows"]}


def test_every_row_is_there_and_finite(tiny_run: dict) -> None:
    result = tiny_run["json"]
    assert result["mode"] == "tiny"
    assert result["failed"] == {} and result["skipped"] == {}
    rows = rows_of(result)
    for stage, metrics in METRICS.items():
        for metric in metrics:
            value = rows[(stage, metric)]["value"]
            assert value is not None and math.isfinite(value), (stage, metric, value)
            assert value >= 0, (stage, metric, value)
        assert rows[(stage, "seconds")]["value"] > 0
        peak = rows[(stage, "peak_memory")]
        if result["machine"]["cuda"] is None:
            assert peak["value"] is None and "no CUDA device" in peak["note"]
        else:
            assert peak["value"] > 0
    for metric in ("tokens_per_s", "completions_per_s_batched", "completions_per_s_single"):
        stage = "sft:tiny" if metric == "tokens_per_s" else "eval:tiny"
        assert rows[(stage, metric)]["value"] > 0
    assert set(rows) == {
        (s, m) for s, ms in METRICS.items() for m in [*ms, "peak_memory", "seconds"]
    }


def test_cosine_paths_agree(tiny_run: dict) -> None:
    rows = rows_of(tiny_run["json"])
    assert rows[("cosine:tiny", "max_abs_cos_diff")]["value"] < 1e-4  # fp32
    assert rows[("cosine:tiny", "loop_over_vectorised")]["value"] > 0


def test_mfu_matches_flops_counted_from_the_shape(tiny_run: dict) -> None:
    result = tiny_run["json"]
    shape = result["shapes"]["tiny"]
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    vocab = result["stages"]["build:tiny"]["details"]["vocab_size"]
    # (in, out) of the seven projections of one decoder layer
    proj = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    n = layers * sum(a * b for a, b in proj.values()) + vocab * h  # + the (tied) LM head
    r = TrainConfig().lora_r
    n_lora = layers * sum(r * (proj[t][0] + proj[t][1]) for t in LORA_TARGETS)
    details = result["stages"]["sft:tiny"]["details"]
    timed = details["steps"][result["sizes"]["sft_warmup"] :]
    tokens = sum(s["tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    peak = result["peak_tflops"]["value"] * 1e12
    rows = rows_of(result)
    assert rows[("sft:tiny", "mfu_6nt")]["value"] == pytest.approx(6 * n * tokens / seconds / peak)
    lora = (4 * n + 6 * n_lora) * tokens / seconds / peak
    assert rows[("sft:tiny", "mfu_lora")]["value"] == pytest.approx(lora)
    assert rows[("sft:tiny", "tokens_per_s")]["value"] == pytest.approx(tokens / seconds)
    assert tokens > 0 and len(timed) == result["sizes"]["sft_steps"] - result["sizes"]["sft_warmup"]


def test_markdown_has_every_row(tiny_run: dict) -> None:
    for r in tiny_run["json"]["rows"]:
        line = f"| {r['stage']} | {r['metric']} | "
        assert line in tiny_run["md"], line
        assert line in tiny_run["stdout"], line


def test_a_failing_stage_exits_non_zero_with_one_line(tiny_random: Path, tmp_path: Path) -> None:
    # --sft-batch 0 reaches train-sft, whose config check refuses it: a real failure of the path.
    proc = run_script(
        "--tiny",
        "--cosine-shapes",
        "",
        "--eval-shapes",
        "",
        "--sft-batch",
        "0",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 1
    line = "gpu_check: sft:tiny failed: --per-device-batch: must be > 0, got 0"
    assert proc.stderr.strip().splitlines()[-1] == line
    assert proc.stderr.count("gpu_check:") == 1
    result = read_json(tmp_path / "gpu_check.json")
    assert set(result["failed"]) == {"sft:tiny"}
    assert "Traceback" in result["failed"]["sft:tiny"]["traceback"]
    assert ("build:tiny", "parameters") in rows_of(result)
    assert "**sft:tiny failed**" in (tmp_path / "gpu_check.md").read_text()
