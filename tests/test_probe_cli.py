"""extract-vhack, probe replay and probe-uat end to end through the CLI on tiny-random.

Run: python -m pytest tests/test_probe_cli.py -q

The pool comes from hand-written completions labelled by the real sandbox (test_probe_pool).
Covers: v_hack tensors, shapes and metadata (pool and pairs input, lora and svd, nll against
contrastive), replay rows and the adapter moving, resume after a kill, the grpo mode with
importance ratios, probe-uat passing, T3 failing when the projection is disabled, and bad input
ending in one `error:` line with exit 2.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_probe_pool import completions_for, problems, write_pool
from typer.testing import CliRunner

from persona_cli.artifacts import read_json, read_jsonl, sha256_file, write_jsonl
from persona_cli.cli import app
from persona_cli.models import load_tokenizer, resolve
from persona_cli.probe import replay as replay_mod
from persona_cli.probe.config import ReplayConfig, ReplayJob
from persona_cli.probe.pool import step_name
from persona_cli.schemas import STEP

LINEARS = 7 * 2  # q, k, v, o, gate, up, down in each of tiny-random's 2 layers


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: Any) -> Any:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    tok = load_tokenizer(resolve("tiny-random"))
    pool = write_pool(root / "pool", tok)
    vh = root / "vhack"
    ok(
        "extract-vhack",
        "--pool",
        pool,
        "-m",
        "tiny-random",
        "--adapter",
        "lora",
        "--rank",
        4,
        "--out",
        vh,
    )
    replay_args = ("probe", "replay", "--pool", pool, "--vhack", vh, "--lr", "1e-2")
    ok(*replay_args, "--out", root / "vanilla")
    ok(*replay_args, "--projected", "--out", root / "projected")
    return {
        "root": root,
        "pool": pool,
        "vhack": vh,
        "vanilla": root / "vanilla",
        "projected": root / "projected",
    }


def test_vhack_tensors_shapes_and_metadata(runs: dict[str, Path]) -> None:
    path = runs["vhack"] / "v_hack.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = orjson.loads(f.metadata()["persona_cli"])
    assert len(tensors) == 2 * LINEARS
    q = "base_model.model" not in next(iter(tensors))  # keys name the base model's modules
    assert q
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 64)
    assert tensors["model.layers.1.mlp.down_proj.lora_B"].shape == (64, 4)
    assert tensors["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)  # 2 kv heads
    # LoRA B starts at 0, so the gradient w.r.t. A (and A's share of v_hack) is exactly 0.
    assert all(t.abs().sum() == 0 for k, t in tensors.items() if k.endswith("lora_A"))
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B"))
    assert meta["model"]["spec"] == "tiny-random" and meta["model"]["revision"]
    assert meta["adapter"] | {"parameters": None} == {
        "kind": "lora",
        "rank": 4,
        "alpha": 16.0,
        "layers": [0, 1],
        "seed": 42,
        "modules": LINEARS,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "parameters": None,
    }
    assert meta["loss"] == "nll"
    assert meta["counts"] == {"hack": 16, "clean": 16, "skipped": 1}
    files = sorted(runs["pool"].glob("step_*.jsonl.gz"))
    assert meta["sources"] == {str(f): sha256_file(f) for f in files}
    rows = read_jsonl(runs["vhack"] / "rows.jsonl.gz")
    assert len(rows) == 33 and [r["reason"] for r in rows if not r["used"]] == ["empty_completion"]
    manifest = read_json(runs["vhack"] / "manifest.json")
    assert {v["sha256"] for v in manifest["inputs"].values()} == {sha256_file(f) for f in files}
    assert (runs["vhack"] / "DONE").is_file()


def test_contrastive_is_the_frequency_weighted_difference(runs: dict[str, Path]) -> None:
    out = runs["root"] / "vhack_contrastive"
    ok(
        "extract-vhack",
        "--pool",
        runs["pool"],
        "-m",
        "tiny-random",
        "--adapter",
        "lora",
        "--rank",
        4,
        "--loss",
        "contrastive",
        "--out",
        out,
    )
    nll = load_file(str(runs["vhack"] / "v_hack.safetensors"))
    con = load_file(str(out / "v_hack.safetensors"))
    # 16 hack and 16 clean rows: (1/32)(sum_H g - sum_C g) = (mean_H g - mean_C g) / 2.
    for key, t in nll.items():
        torch.testing.assert_close(con[key], t / 2, rtol=1e-4, atol=1e-7)


def test_svd_adapter_from_a_pairs_file(runs: dict[str, Path]) -> None:
    tok = load_tokenizer(resolve("tiny-random"))
    prompts = {r["problem_id"]: r["prompt"] for r in read_jsonl(runs["pool"] / step_name(0))}
    prompts |= {r["problem_id"]: r["prompt"] for r in read_jsonl(runs["pool"] / step_name(1))}
    pairs = runs["root"] / "pairs.jsonl"
    rows = []
    for p in problems():
        texts = dict(completions_for(p))
        rows.append({"prompt": prompts[p.id], "hack": texts["hack_stub"], "clean": texts["right"]})
    write_jsonl(pairs, rows)
    out = runs["root"] / "vhack_svd"
    ok(
        "extract-vhack",
        "--pairs",
        pairs,
        "-m",
        "tiny-random",
        "--adapter",
        "svd",
        "--rank",
        3,
        "--layers",
        "1",
        "--targets",
        "q_proj,down_proj",
        "--out",
        out,
    )
    tensors = load_file(str(out / "v_hack.safetensors"))
    assert sorted(tensors) == [
        "model.layers.1.mlp.down_proj.delta",
        "model.layers.1.self_attn.q_proj.delta",
    ]
    assert all(t.shape == (3,) and t.abs().sum() > 0 for t in tensors.values())
    with safe_open(str(out / "v_hack.safetensors"), framework="pt") as f:
        meta = orjson.loads(f.metadata()["persona_cli"])
    assert meta["adapter"]["kind"] == "svd" and meta["adapter"]["layers"] == [1]
    assert meta["counts"] == {"hack": 4, "clean": 4, "skipped": 0}
    assert meta["sources"] == {str(pairs): sha256_file(pairs)}
    del tok


def test_replay_rows_and_the_adapter_moves(runs: dict[str, Path]) -> None:
    pool = {s: read_jsonl(runs["pool"] / step_name(s)) for s in range(4)}
    for s in range(4):
        van = read_jsonl(runs["vanilla"] / step_name(s))
        proj = read_jsonl(runs["projected"] / step_name(s))
        assert [(r["step"], r["sample_index"]) for r in van] == [
            (r["step"], r["sample_index"]) for r in pool[s]
        ]
        assert all(not STEP.check(r) for r in van + proj)
        for r in van:
            assert len(r["cos_in"]) == LINEARS and not any(r["fired"].values())
            assert r["cos_out"] == r["cos_in"]
        for r in proj:
            for m, fired in r["fired"].items():
                if fired:
                    assert r["cos_in"][m] > 0 and abs(r["cos_out"][m]) < 1e-5
                elif r["cos_in"][m] is not None:
                    assert r["cos_out"][m] == r["cos_in"][m]
    first_van = read_jsonl(runs["vanilla"] / step_name(0))
    first_proj = read_jsonl(runs["projected"] / step_name(0))
    assert [r["cos"] for r in first_van] == [r["cos"] for r in first_proj]  # same weights at step 0
    empty = read_jsonl(runs["vanilla"] / step_name(3))[-1]
    assert empty["cos"] is None and empty["reason"] == "empty_completion" and not empty["in_update"]
    summary = read_json(runs["projected"] / "summary.json")
    assert all(s["frac_fired"] > 0 for s in summary["steps"])
    hacked = [
        r["cos"]
        for s in range(4)
        for r in read_jsonl(runs["vanilla"] / step_name(s))
        if r["hacked"]
    ]
    clean = [
        r["cos"]
        for s in range(4)
        for r in read_jsonl(runs["vanilla"] / step_name(s))
        if not r["hacked"] and r["cos"] is not None
    ]
    assert sum(hacked) / len(hacked) > sum(clean) / len(clean)
    init = load_file(str(runs["vanilla"] / "adapter_init.safetensors"))
    final = load_file(str(runs["vanilla"] / "adapter_final.safetensors"))
    assert any(not torch.equal(init[k], final[k]) for k in init)
    # Only the checkpoint after the last step is kept.
    assert [p.name for p in (runs["vanilla"] / "checkpoints").iterdir()] == [
        "after_step_000003.safetensors"
    ]


def test_replay_resumes_at_the_first_missing_step(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = runs["root"] / "killed"
    real_write = replay_mod.write_jsonl

    def killed_at_step_2(path: Path, rows: Any, **kw: Any) -> int:
        if path.name == step_name(2):
            raise KeyboardInterrupt  # a kill after step 2's checkpoint, before its rows
        return real_write(path, rows, **kw)

    monkeypatch.setattr(replay_mod, "write_jsonl", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        job = ReplayJob(
            pool=str(runs["pool"]), vhack=str(runs["vhack"]), replay=ReplayConfig(lr=1e-2)
        )
        replay_mod.replay(job, out)
    monkeypatch.setattr(replay_mod, "write_jsonl", real_write)
    assert sorted(p.name for p in out.glob("step_*")) == [step_name(0), step_name(1)]
    assert not (out / "DONE").exists()
    before = {s: (out / step_name(s)).stat().st_mtime_ns for s in (0, 1)}

    ok(
        "probe",
        "replay",
        "--pool",
        runs["pool"],
        "--vhack",
        runs["vhack"],
        "--lr",
        "1e-2",
        "--out",
        out,
    )
    assert {s: (out / step_name(s)).stat().st_mtime_ns for s in (0, 1)} == before  # not redone
    for s in range(4):  # the same rows and weights as the uninterrupted run
        assert (out / step_name(s)).read_bytes() == (runs["vanilla"] / step_name(s)).read_bytes()
    assert (out / "adapter_final.safetensors").read_bytes() == (
        runs["vanilla"] / "adapter_final.safetensors"
    ).read_bytes()
    assert read_json(out / "manifest.json")["timing"]["attempts"] == 2


def test_grpo_advantages_reasons_and_importance_ratios(runs: dict[str, Path]) -> None:
    pool = runs["root"] / "pool_logprobs"
    pool.mkdir()
    for s in range(4):
        rows = read_jsonl(runs["pool"] / step_name(s))
        if s == 0:  # old log-probs: all 0 (p = 1) on row 0, a wrong length on row 1
            rows[0]["old_logprobs"] = [0.0] * rows[0]["n_completion_tokens"]
            rows[1]["old_logprobs"] = [0.0]
        write_jsonl(pool / step_name(s), rows)
    out = runs["root"] / "grpo"
    ok(
        "probe",
        "replay",
        "--pool",
        pool,
        "--vhack",
        runs["vhack"],
        "--loss",
        "grpo",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--out",
        out,
    )
    step0 = read_jsonl(out / step_name(0))
    # Each problem's group: right 1, wrong 0, hack_right 1, hack_stub 1 -> mean 0.75.
    assert [r["advantage"] for r in step0] == [0.25, -0.75, 0.25, 0.25] * 2
    assert 0 < step0[0]["ratio_max"] <= 1.0 and step0[0]["reason"] is None
    assert step0[1]["ratio_mean"] is None and "old_logprobs has 1 values" in step0[1]["reason"]
    empty = read_jsonl(out / step_name(3))[-1]  # alone in its group: advantage 0
    assert empty["advantage"] == 0.0 and empty["reason"] == "empty_completion"
    summary = read_json(out / "summary.json")
    assert [s["hack_rate"] for s in summary["steps"]] == [0.5, 0.5, 0.5, 4 / 9]
    assert summary["steps"][0]["ratio_rows"] == 1


def test_uat_passes_and_t3_fails_without_projection(runs: dict[str, Path]) -> None:
    good = invoke(
        "probe-uat",
        "--pool",
        runs["pool"],
        "--vanilla",
        runs["vanilla"],
        "--projected",
        runs["projected"],
        "--out",
        runs["root"] / "uat",
    )
    assert good.exit_code == 0, good.output
    report = read_json(runs["root"] / "uat" / "uat.json")
    assert report["passed"] and [c["name"] for c in report["checks"]] == ["T1", "T2", "T3", "T4"]
    assert report["checks"][0]["value"] == pytest.approx(16 / 33)
    assert report["checks"][1]["value"] == pytest.approx(32 / 33)
    assert all(c["guards"] for c in report["checks"])

    # The vanilla run as the "projected" one: a projection that changes nothing.
    bad = invoke(
        "probe-uat",
        "--pool",
        runs["pool"],
        "--vanilla",
        runs["vanilla"],
        "--projected",
        runs["vanilla"],
        "--out",
        runs["root"] / "uat_noproj",
    )
    assert bad.exit_code == 1, bad.output
    checks = {c["name"]: c for c in read_json(runs["root"] / "uat_noproj" / "uat.json")["checks"]}
    assert not checks["T3"]["passed"] and checks["T3"]["value"] == 0.0
    assert checks["T1"]["passed"] and checks["T2"]["passed"] and checks["T4"]["passed"]

    strict = invoke(
        "probe-uat",
        "--pool",
        runs["pool"],
        "--vanilla",
        runs["vanilla"],
        "--projected",
        runs["projected"],
        "--t1-min-hack-rate",
        "0.9",
        "--out",
        runs["root"] / "uat_strict",
    )
    assert strict.exit_code == 1
    assert [c["passed"] for c in read_json(runs["root"] / "uat_strict" / "uat.json")["checks"]] == [
        False,
        True,
        True,
        True,
    ]


def _one_error_line(result: Any, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]


def _filtered_pool(src: Path, dst: Path, keep: Any) -> Path:
    dst.mkdir()
    for s in range(4):
        rows = [r for r in read_jsonl(src / step_name(s)) if keep(r)]
        rows = [{**r, "sample_index": i} for i, r in enumerate(rows)]
        (dst / step_name(s)).write_bytes(
            gzip.compress(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        )
    return dst


def test_bad_input_is_one_error_line_and_exit_2(runs: dict[str, Path]) -> None:
    root = runs["root"]
    clean_only = _filtered_pool(runs["pool"], root / "clean_only", lambda r: not r["hacked"])
    hack_only = _filtered_pool(runs["pool"], root / "hack_only", lambda r: r["hacked"])
    extract = ("extract-vhack", "-m", "tiny-random", "--out")
    _one_error_line(
        invoke(*extract, root / "e1", "--pool", clean_only), str(clean_only), "no hack rows"
    )
    _one_error_line(
        invoke(*extract, root / "e2", "--pool", hack_only), str(hack_only), "no clean rows"
    )
    _one_error_line(
        invoke(*extract, root / "e3", "--pool", runs["pool"], "--adapter", "dora"),
        "--adapter 'dora'",
    )
    _one_error_line(
        invoke(
            "probe",
            "replay",
            "--pool",
            runs["pool"],
            "--vhack",
            runs["vhack"],
            "-m",
            "smollm2-135m",
            "--out",
            root / "r1",
        ),
        "--vhack",
        "extracted on model 'tiny-random'",
        "not on 'smollm2-135m'",
    )
    _one_error_line(
        invoke(
            "probe-uat",
            "--pool",
            runs["pool"],
            "--vanilla",
            runs["vanilla"],
            "--projected",
            root / "missing",
            "--out",
            root / "u1",
        ),
        str(root / "missing"),
    )
    assert not (root / "e1").exists() and not (root / "r1").exists()  # refused before any output
