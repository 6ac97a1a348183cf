"""The protocol guard on real runs: two runs that differ only in one guarded field are refused.

Every run here is made by the real command on tiny-random (eval-markers, train-sft, judge-align
against a real HTTP server on localhost), then `persona-cli compare` is asked to put them side
by side: refused with exit 3 naming the field, passed when the protocols are identical, and let
through and reported with `--allow-diff FIELD`. The backend field is tested beside the vLLM
engine (tests/test_eval_vllm.py) and the world size beside the two-process training run
(tests/test_train.py), where those runs already exist. Manifests of the first release (schema 1,
tests/fixtures/manifest_v1, written by commit 10567c7) are read and guarded too.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona_cli.artifacts import read_json
from persona_cli.cli import app
from persona_cli.guard import protocol_of
from persona_cli.protocol import (
    GUARDED_FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    details,
    recorded_fields,
    sampling_of,
)
from persona_cli.rundir import open_run

HERE = Path(__file__).parent
V1 = HERE / "fixtures" / "manifest_v1"
QUESTIONS = "- id: q0\n  paraphrases: ['Name a colour.']\n- id: q1\n  paraphrases: ['Say hi.']\n"
EVAL = ["--model", "tiny-random", "--personas-ids", "assistant,villain", "--source", "villain"]
EVAL += ["--samples", "2", "--max-new-tokens", "3"]

# variant -> (extra eval-markers options, the one field that differs from base_s1)
EVAL_VARIANTS = {
    "temperature": (["--temperature", "0.7"], "temperature"),
    "max_new_tokens": (["--max-new-tokens", "5"], "max_new_tokens"),
    "samples": (["--samples", "3"], "samples_per_prompt"),
    "top_p": (["--top-p", "0.9"], "top_p"),
    "marker": (["--marker", "[XYZ]"], "marker"),
    "case": (["--ignore-case"], "marker_case_sensitive"),
}
# variant -> (extra train-sft options, the field of stage[0] that differs)
TRAIN = ["--model", "tiny-random", "--max-steps", "1", "--per-device-batch", "2"]
TRAIN += ["--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "64"]
TRAIN_VARIANTS = {
    "learning_rate": (["--lr", "3e-4"], "learning_rate"),
    "effective_batch": (["--grad-accum", "2"], "effective_batch"),
    "steps": (["--max-steps", "2"], "optimizer_steps"),
    "lora_r": (["--lora-r", "8"], "lora_r"),
}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str):
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    return res


def compare(root: Path, a: Path, b: Path, *extra: str, name: str = "cmp"):
    out = root / f"{name}_{a.name}_{b.name}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["compare", "-c", f"a={a}", "-c", f"b={b}", "--metric", "source.rate"]
    return invoke(*args, "--reference", "a", "--out", out, *extra), out


def refused_fields(res) -> list[str]:
    """The fields named on the refusal line (`... differ in: f1, f2 (pass ...`)."""
    assert res.exit_code == 3, res.output
    line = next(ln for ln in res.output.splitlines() if "differ in:" in ln)
    return [f.strip() for f in line.split("differ in:")[1].split("(pass")[0].split(",")]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guard")
    (path / "questions.yaml").write_text(QUESTIONS)
    return path


@pytest.fixture(scope="module")
def evals(prepared_home: Path, root: Path) -> dict[str, Path]:
    runs = {}
    q = root / "questions.yaml"
    for name, extra in [
        ("base_s1", []),
        ("base_s2", ["--seed", "2"]),
        ("temperature_s2", ["--temperature", "0.7", "--seed", "2"]),
        *((name, opts) for name, (opts, _) in EVAL_VARIANTS.items()),
    ]:
        runs[name] = root / "eval" / name
        ok("eval-markers", "--out", runs[name], "--questions", q, *EVAL, *extra)
    return runs


@pytest.fixture(scope="module")
def trained(prepared_home: Path, root: Path) -> dict[str, Path]:
    """An eval-markers run on the adapter of each train-sft variant."""
    chat = root / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A"}]}
        for i in range(8)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for name, extra in [("base", []), *((n, o) for n, (o, _) in TRAIN_VARIANTS.items())]:
        train = root / "train" / name
        ok("train-sft", "--out", train, "--data", chat, *TRAIN, *extra)
        runs[name] = root / "on_adapter" / name
        q = root / "questions.yaml"
        ok("eval-markers", "--out", runs[name], "--adapter", train, "--questions", q, *EVAL)
    return runs


def test_the_reported_case_two_seeds_each_temperature_is_refused(root, evals) -> None:
    """The review's case: eval-markers at --temperature 1.0 and 0.7, two seeds each."""
    out = root / "cmp_issue"
    res = invoke(
        "compare",
        "-c",
        f"t10={root}/eval/base_s*",
        "-c",
        f"t07={root}/eval/temperature*",
        "--metric",
        "source.rate",
        "--reference",
        "t10",
        "--out",
        out,
    )
    assert refused_fields(res) == ["temperature"]
    assert "temperature: 1.0 in" in res.output and "0.7 in" in res.output
    assert not out.exists()  # a refused comparison leaves nothing behind


@pytest.mark.parametrize("variant", list(EVAL_VARIANTS))
def test_each_sampling_and_marker_field_is_refused_then_allowed(root, evals, variant) -> None:
    field = EVAL_VARIANTS[variant][1]
    res, _ = compare(root, evals["base_s1"], evals[variant])
    assert refused_fields(res) == [field]
    res, out = compare(root, evals["base_s1"], evals[variant], "--allow-diff", field)
    assert res.exit_code == 0, res.output
    assert f"allowed protocol difference (--allow-diff): {field}" in res.output
    allowed = read_json(out / "compare.json")["allowed_differences"]
    assert [d["field"] for d in allowed] == [field]


def test_identical_protocols_pass_with_nothing_to_declare(root, evals) -> None:
    res, out = compare(root, evals["base_s1"], evals["base_s2"])
    assert res.exit_code == 0, res.output
    assert read_json(out / "compare.json")["allowed_differences"] == []


def test_report_refuses_inputs_whose_runs_differ(root, evals) -> None:
    """Two stats runs, each consistent on its own, put side by side by `report`."""
    for name, pattern in (("t10", "base_s*"), ("t07", "temperature*")):
        ok(
            "stats",
            "-c",
            f"{name}={root}/eval/{pattern}",
            "--metric",
            "source.rate",
            "-o",
            root / f"stats_{name}",
        )
    sources = [root / "stats_t10", root / "stats_t07"]
    res = invoke("report", *sources, "--out", root / "report")
    assert refused_fields(res) == ["temperature"]
    assert not (root / "report").exists()
    ok("report", *sources, "--out", root / "report", "--allow-diff", "temperature")
    assert (root / "report" / "report.md").is_file()


def test_allow_diff_of_another_field_does_not_let_it_through(root, evals) -> None:
    res, _ = compare(root, evals["base_s1"], evals["temperature"], "--allow-diff", "top_p")
    assert refused_fields(res) == ["temperature"]
    res, _ = compare(root, evals["base_s1"], evals["temperature"], "--allow-diff", "tempreature")
    assert res.exit_code == 2 and "'tempreature': not a guarded field" in res.output
    assert "or stage[i].FIELD" in res.output  # brackets in messages are not rich markup


@pytest.mark.parametrize("variant", list(TRAIN_VARIANTS))
def test_each_training_field_of_the_adapter_stack_is_refused(root, trained, variant) -> None:
    field = TRAIN_VARIANTS[variant][1]
    res, _ = compare(root, trained["base"], trained[variant])
    named = refused_fields(res)
    assert f"stage[0].{field}" in named
    assert all(n.startswith("stage[0].") for n in named)  # the evaluations themselves agree
    # Declared for that stage only, or for every stage: both let the comparison through.
    for allow in (named, [n.split(".", 1)[1] for n in named]):
        flags = [x for f in allow for x in ("--allow-diff", f)]
        res, _ = compare(root, trained["base"], trained[variant], *flags)
        assert res.exit_code == 0, res.output


def test_an_adapter_run_and_a_base_run_differ_by_the_stage(root, trained, evals) -> None:
    res, _ = compare(root, evals["base_s1"], trained["base"])
    assert "stage[0].learning_rate" in refused_fields(res)


def _fault_server():
    spec = importlib.util.spec_from_file_location(
        "guard_fault_server", HERE / "chat_api_fault_server.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.FaultServer()


JUDGE_VARIANTS = {
    "judge_model": ["--judge-model", "judge-b"],
    "judge_prompt_sha256": ["--judge-system-prompt", "Be strict."],
    "judge_scoring": ["--scoring", "parsed"],
    "judge_min_number_mass": ["--min-number-mass", "0.5"],
}


def test_judge_fields_are_refused(root, evals, monkeypatch: pytest.MonkeyPatch) -> None:
    """judge-align on one eval-markers run's samples, through a real HTTP server on localhost:
    another judge model, judge prompt, scoring mode or number-mass threshold is refused."""
    monkeypatch.setenv("GUARD_JUDGE_KEY", "sk-guard-test")
    samples = evals["base_s1"] / "samples.jsonl.gz"
    with _fault_server() as server:
        judged = {}
        for name, extra in [("base", []), *JUDGE_VARIANTS.items()]:
            judged[name] = root / "judge" / name
            ok(
                "judge-align",
                "--input",
                samples,
                "--out",
                judged[name],
                "--judge-model",
                "judge-a",
                "--base-url",
                f"{server.url}/v1",
                "--api-key-env",
                "GUARD_JUDGE_KEY",
                *extra,
            )
    for field in JUDGE_VARIANTS:
        out = root / f"cmp_judge_{field}"
        res = invoke(
            "compare",
            "-c",
            f"a={judged['base']}",
            "-c",
            f"b={judged[field]}",
            "--metric",
            "em.n_items",
            "--reference",
            "a",
            "--out",
            out,
        )
        assert refused_fields(res) == [field]
    # The judged run's sampling travels with its judgments: judging another sampling differs.
    assert protocol_of(judged["base"])["temperature"] == 1.0


def test_every_guarded_field_is_required_by_some_command() -> None:
    required = set().union(*REQUIRED_FIELDS.values())
    assert not required & OPTIONAL_FIELDS
    assert required | OPTIONAL_FIELDS == set(GUARDED_FIELDS)


def test_required_fields_name_commands_the_cli_has() -> None:
    names = set()
    for command in app.registered_commands:
        names.add(command.name)
    for group in app.registered_groups:
        for command in group.typer_instance.registered_commands:
            names.add(f"{group.name} {command.name}")
    assert set(REQUIRED_FIELDS) <= names, set(REQUIRED_FIELDS) - names


def test_every_manifest_written_here_yields_its_commands_fields(root, evals, trained) -> None:
    """Walk GUARDED_FIELDS against each command's manifest: a command that stops recording a
    field it has fails here (and, earlier, in RunDir.finish)."""
    manifests = sorted(root.rglob("manifest.json"))
    commands = {read_json(m)["command"] for m in manifests}
    assert {"eval-markers", "train-sft"} <= commands
    for m in manifests:
        manifest = read_json(m)
        fields = recorded_fields(manifest, m, read_json(m.parent / "config.json"))
        assert REQUIRED_FIELDS.get(manifest["command"], set()) <= set(fields), m
        assert set(fields) <= set(GUARDED_FIELDS)


def test_finish_refuses_a_protocol_missing_a_field_or_a_free_form_dict(root) -> None:
    from persona_cli.generate import GenerationConfig

    run = open_run(root / "unfinished", command="eval-markers", config={})
    partial = sampling_of(GenerationConfig(), backend="hf", world_size=1) | details(note="x")
    with pytest.raises(ValueError, match="marker"):
        run.finish(protocol=partial)
    with pytest.raises(TypeError, match="RunProtocol"):
        run.finish(protocol={"temperature": 1.0})  # type: ignore[arg-type]
    assert not (root / "unfinished" / "manifest.json").exists()
    assert not (root / "unfinished" / "DONE").exists()


def test_schema_1_runs_are_read_and_guarded(root, evals) -> None:
    """Run directories of the first release (sampling nested under protocol.generation)."""
    v1 = {name: V1 / name for name in ("t1.0_s1", "t1.0_s2", "t0.7_s1")}
    assert read_json(v1["t1.0_s1"] / "manifest.json")["schema_version"] == 1
    fields = protocol_of(v1["t1.0_s1"])
    assert fields["temperature"] == 1.0 and fields["samples_per_prompt"] == 2
    assert fields["marker"] == "[ZLT]" and fields["marker_case_sensitive"] is True
    res, _ = compare(root, v1["t1.0_s1"], v1["t0.7_s1"], name="v1")
    assert refused_fields(res) == ["temperature"]
    res, _ = compare(root, v1["t1.0_s1"], v1["t1.0_s2"], name="v1")
    assert res.exit_code == 0, res.output
    # A schema-1 run against a schema-2 run made now with the same settings: nothing differs.
    now = root / "v2_like_v1"
    ok(
        "eval-markers",
        "--out",
        now,
        "--model",
        "tiny-random",
        "--personas-ids",
        "assistant,villain,pirate",
        "--samples",
        "2",
        "--max-new-tokens",
        "4",
        "--seed",
        "3",
        "--source",
        "villain",
    )
    res, _ = compare(root, v1["t1.0_s1"], now, name="v1")
    assert res.exit_code == 0, res.output
    res, _ = compare(root, v1["t0.7_s1"], now, name="v1")
    assert refused_fields(res) == ["temperature"]
    train = protocol_of(V1 / "train")
    assert (train["lora_r"], train["learning_rate"], train["effective_batch"]) == (4, 1e-4, 2)
    assert invoke("validate", V1 / "t1.0_s1" / "manifest.json").exit_code == 0
