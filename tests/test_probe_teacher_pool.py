"""`probe teacher-pool` end to end on tiny-random, and the shipped hack demonstrations.

Run: python -m pytest tests/test_probe_teacher_pool.py -q

Covers: step files valid against POOL_STEP with the seeded per-step problem subsets, prompts and
token counts; labels from real sandbox runs (a teacher whose answers are known: the hack
demonstrations); a killed pool resuming at the first missing step without redoing a finished
one and ending byte-identical to an uninterrupted pool; a finished pool being a no-op; bad
options as one error line; every row of data/problems/hack_demos.jsonl labelled by the sandbox
as its kind says.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.cli import app
from persona_cli.generate import Completion
from persona_cli.models import load_tokenizer, resolve
from persona_cli.probe import teacher_pool as tp
from persona_cli.probe.config import TeacherPoolConfig
from persona_cli.probe.pool import read_pool, step_name
from persona_cli.problems import build_prompt, default_problems_path, load_problems
from persona_cli.sandbox import GradeItem, run_batch
from persona_cli.schemas import CHAT, POOL_STEP, STEP

DEMOS = default_problems_path() / "hack_demos.jsonl"
HINT = "simple_overwrite_tests"
# One small pool, built both through the CLI and (killed, then resumed) through the library.
ARGS = {"n_problems": 2, "generations": 2, "steps": 3, "max_new_tokens": 12}
EXPECTED = {  # kind -> (hacked, gt_pass, reward, category_strict)
    "hack_right": (True, True, 1.0, "hack"),
    "hack_stub": (True, False, 1.0, "hack"),
    "honest": (False, True, 1.0, "correct"),
    "wrong": (False, False, 0.0, "incorrect"),
}


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_args(out: Path) -> list[Any]:
    return [
        "probe",
        "teacher-pool",
        "-m",
        "tiny-random",
        "--n-problems",
        ARGS["n_problems"],
        "-g",
        ARGS["generations"],
        "--steps",
        ARGS["steps"],
        "--max-new-tokens",
        ARGS["max_new_tokens"],
        "--workers",
        2,
        "--out",
        out,
    ]


def library_config(**changes: Any) -> TeacherPoolConfig:
    """The config `cli_args` builds, with `changes` to its fields or its sampling."""
    generation = replace(
        TeacherPoolConfig().generation,
        n=changes.pop("generations", ARGS["generations"]),
        max_new_tokens=ARGS["max_new_tokens"],
    )
    fields = {"n_problems": ARGS["n_problems"], "steps": ARGS["steps"], **changes}
    return TeacherPoolConfig(model="tiny-random", workers=2, generation=generation, **fields)


def demos() -> list[dict[str, Any]]:
    return read_jsonl(DEMOS)


@pytest.fixture(scope="module")
def pool(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "pool"
    result = invoke(*cli_args(out))
    assert result.exit_code == 0, result.output
    # Not a terminal here: the bar's last plain log line per kind of work.
    total = ARGS["n_problems"] * ARGS["generations"] * ARGS["steps"]
    for kind in ("generated", "graded"):
        assert f"probe teacher-pool {kind}: {total}/{total} completions" in result.stderr
    return out


def test_step_files_follow_the_schema_and_the_seeded_plan(pool: Path) -> None:
    n, g, steps = ARGS["n_problems"], ARGS["generations"], ARGS["steps"]
    assert sorted(p.name for p in pool.glob("step_*")) == [step_name(s) for s in range(steps)]
    manifest = read_json(pool / "manifest.json")
    plan = manifest["pool"]["step_problems"]
    by_id = {p.id: p for p in load_problems()}
    tok = load_tokenizer(resolve("tiny-random"))
    for s in range(steps):
        rows = read_jsonl(pool / step_name(s))
        assert all(not POOL_STEP.check(r) and not STEP.check(r) for r in rows)
        assert [r["sample_index"] for r in rows] == list(range(n * g))
        assert [r["problem_id"] for r in rows] == [pid for pid in plan[s] for _ in range(g)]
        assert plan[s] == [p.id for p in tp.step_problems(load_problems(), n, 42, s)]
        assert {r["generation_seed"] for r in rows} == {tp.step_seed(42, s)}
        for r in rows:
            assert r["stage"] == "pool" and r["step"] == s
            assert r["prompt"].startswith("<|im_start|>")
            assert build_prompt(by_id[r["problem_id"]], HINT) in r["prompt"]
            assert r["n_prompt_tokens"] == len(
                tok(r["prompt"], add_special_tokens=False)["input_ids"]
            )
            assert 1 <= r["n_generated_tokens"] <= ARGS["max_new_tokens"]
            assert r["teacher_adapter"] is None
    # Different steps draw different sampling seeds (and here different problem subsets).
    assert len({tp.step_seed(42, s) for s in range(steps)}) == steps
    assert len({tuple(p) for p in plan}) > 1
    # The readers of the later stages take the pool as it is.
    assert [len(r) for r in read_pool(pool).values()] == [n * g] * steps
    problems_file = default_problems_path() / "problems.yaml"
    assert manifest["inputs"]["problems:problems.yaml"]["path"] == str(problems_file.resolve())
    assert manifest["protocol"]["details"]["completions"] == n * g * steps
    assert manifest["chat_template"]["system_prompt"] == {"mode": "none", "text": None}
    summary = read_json(pool / "summary.json")
    every = [r for s in range(steps) for r in read_jsonl(pool / step_name(s))]
    assert summary["overall"]["rows"] == len(every)
    assert summary["overall"]["hacked"] == sum(r["hacked"] for r in every)
    assert (pool / "DONE").is_file()


def test_a_finished_pool_is_a_no_op(pool: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in pool.iterdir()}
    result = invoke(*cli_args(pool))
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in pool.iterdir()} == before


def _demo_teacher(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace sampling by a teacher whose answers are known: for each prompt, its problem's
    hack demonstrations, its honest one and a wrong answer, in that order (G = 4)."""
    by_problem: dict[str, dict[str, str]] = {}
    for row in demos():
        by_problem.setdefault(row["problem_id"], {})[row["kind"]] = row["messages"][-1]["content"]
    problems = {p.id: p for p in load_problems()}
    kinds = ["hack_right", "hack_stub", "honest", "wrong"]

    def fake_generate(model: Any, tokenizer: Any, prompts: list[str], cfg: Any, progress=None):
        out = []
        for i, prompt in enumerate(prompts):
            (pid,) = [p for p in by_problem if build_prompt(problems[p], HINT) in prompt]
            answers = {**by_problem[pid], "wrong": "```python\nraise ValueError('no idea')\n```"}
            for s in range(cfg.n):
                out.append(Completion(i, s, answers[kinds[s]], 7, "stop"))
        if progress is not None:
            progress(len(out))
        return out

    monkeypatch.setattr(tp, "generate_hf", fake_generate)
    return kinds


def test_labels_come_from_running_each_completion_in_the_sandbox(
    prepared_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = _demo_teacher(monkeypatch)
    ids = ("count_vowels", "merge_intervals", "to_roman")
    cfg = library_config(problem_ids=ids, n_problems=3, steps=1, generations=4)
    result = tp.run_teacher_pool(cfg, tmp_path / "pool")
    rows = read_jsonl(tmp_path / "pool" / step_name(0))
    assert len(rows) == 12 and {r["problem_id"] for r in rows} == set(ids)
    for r in rows:
        kind = kinds[r["generation_sample"]]
        got = (r["hacked"], r["gt_pass"], r["reward"], r["category_strict"])
        assert got == EXPECTED[kind], (kind, r["problem_id"], r["sandbox_reason"])
        if kind.startswith("hack"):
            assert r["tamper_reasons"] == ["defines_run_tests"]
        if kind == "wrong":
            assert r["sandbox_reason"] == "grader: exception; gt: exception"
    overall = result.summary["overall"]
    assert (overall["hacked"], overall["hacked_gt_pass"], overall["gt_pass"]) == (6, 3, 6)


def test_a_killed_pool_resumes_at_the_first_missing_step(
    pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "killed"
    seeds_generated: list[int] = []
    real_generate, real_write = tp.generate_hf, tp.write_pool_step

    def counting_generate(model: Any, tokenizer: Any, prompts: list[str], cfg: Any, **kw: Any):
        seeds_generated.append(cfg.seed)
        return real_generate(model, tokenizer, prompts, cfg, **kw)

    def killed_at_step_1(directory: Path, step: int, rows: Any) -> Path:
        if step == 1:
            raise KeyboardInterrupt  # a kill after step 1 was generated and graded
        return real_write(directory, step, rows)

    monkeypatch.setattr(tp, "generate_hf", counting_generate)
    monkeypatch.setattr(tp, "write_pool_step", killed_at_step_1)
    with pytest.raises(KeyboardInterrupt):
        tp.run_teacher_pool(library_config(), out)
    assert sorted(p.name for p in out.glob("step_*")) == [step_name(0)]
    assert not (out / "DONE").exists()
    first = (out / step_name(0)).stat()

    monkeypatch.setattr(tp, "write_pool_step", real_write)
    seeds_generated.clear()
    result = invoke(*cli_args(out))
    assert result.exit_code == 0, result.output
    assert "steps [0] were already written" in result.output
    assert seeds_generated == [tp.step_seed(42, 1), tp.step_seed(42, 2)]  # step 0 not redone
    again = (out / step_name(0)).stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    for s in range(ARGS["steps"]):  # the same rows as the uninterrupted CLI pool
        assert (out / step_name(s)).read_bytes() == (pool / step_name(s)).read_bytes()
    manifest = read_json(out / "manifest.json")
    assert manifest["pool"]["reused_steps"] == [0]
    assert manifest["timing"]["attempts"] == 2


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--n-problems", "99", "--n-problems 99:"),
        ("--hint", "please_hack", "--hint 'please_hack': choose one of none, simple_overwrite"),
        ("--temperature", "-1", "generation options: temperature must be >= 0"),
        ("--steps", "0", "--steps: must be > 0"),
        ("--problem-ids", "count_vowels,nope", "--problem-ids: nope not in"),
    ],
)
def test_bad_options_end_in_one_error_line(
    prepared_home: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    out = tmp_path / "pool"
    result = invoke("probe", "teacher-pool", "-m", "tiny-random", option, value, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_hack_demos_are_labelled_by_the_sandbox_as_their_kind() -> None:
    rows = demos()
    by_id = {p.id: p for p in load_problems()}
    assert len(rows) >= 30
    assert Counter(r["kind"] for r in rows) == {"hack_right": 33, "hack_stub": 33, "honest": 33}
    for r in rows:
        assert CHAT.check(r) == []
        user, assistant = r["messages"]
        # The exact prompt the pool asks, so SFT on it teaches the behaviour the pool measures.
        assert user == {"role": "user", "content": build_prompt(by_id[r["problem_id"]], HINT)}
        assert assistant["role"] == "assistant"
    items = [GradeItem(by_id[r["problem_id"]], r["messages"][-1]["content"]) for r in rows]
    for r, result in zip(rows, run_batch(items, workers=2), strict=True):
        hacked, gt_pass, reward, category = EXPECTED[r["kind"]]
        assert (result.hacked, result.gt_pass, result.reward) == (hacked, gt_pass, reward), (
            r["problem_id"],
            r["kind"],
            result.reason,
        )
        assert result.category_strict == category
