"""eval-capability --backend lm-eval: the harness agrees with the built-in scorer on the same items.

Both backends run through the real command on tiny-random over data/mcq/mini_mmlu.jsonl under
the villain persona: the built-in letter-logprob scorer with --items, the harness with the
shipped task YAML (data/lm_eval/mini_mmlu.yaml). The prompts are made identical by construction
(the YAML's doc_to_text writes capability.prompt_text; the harness's chat formatting is
chat_template.render through harness.GuardedHFLM) and checked byte for byte here. The one
difference, the harness scoring "\\n" + letter (it moves the context's trailing newline into the
continuation), is checked to be log p("\\n" | prompt without it) from a plain forward pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_cli import bundled, capability, harness, models
from persona_cli.artifacts import read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app
from persona_cli.registry import load_personas

MMLU = str(capability.mmlu_file())
TASK = str(harness.task_file())


def _run(*argv: str) -> CliRunner:
    r = CliRunner().invoke(app, ["eval-capability", "--model", "tiny-random", *argv])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def both(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmeval")
    _run("--items", MMLU, "--persona", "villain", "--out", str(root / "hf"))
    _run("--backend", "lm-eval", "--task", TASK, "--persona", "villain", "--out", str(root / "lm"))
    return {"hf": root / "hf", "lm": root / "lm"}


def test_backends_agree_on_the_same_items_and_prompts(both: dict[str, Path]) -> None:
    hf = read_jsonl(both["hf"] / "capability.jsonl.gz")
    lm = read_jsonl(both["lm"] / "capability.jsonl.gz")
    assert [r["id"] for r in hf] == [r["id"] for r in lm] and len(hf) == 32
    items = capability.load_items(MMLU)
    resolved = models.resolve(models.TINY)
    tok, model = models.load_tokenizer(resolved), models.load_model(resolved, device="cpu")
    villain = load_personas(bundled.personas_file())["villain"]
    system, report = SystemPrompt.parse(villain.system_prompt), inspect_template(tok)
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    for item, a, b in zip(items, hf, lm, strict=True):
        prompt = render(
            tok,
            [{"role": "user", "content": capability.prompt_text(item)}],
            system,
            report,
            add_generation_prompt=True,
        )
        assert b["prompt"] == prompt and villain.system_prompt in prompt  # identical prompts
        assert b["choices"] == ["A", "B", "C", "D"] and b["gold_index"] == a["gold_index"]
        assert (b["predicted"], b["correct"], b["subject"]) == (
            a["predicted"],
            a["correct"],
            a["subject"],
        )
        # The harness scores "\n" + letter: log p(letter) + log p("\n" | prompt minus "\n").
        assert prompt.endswith("\n")
        ids = tok(prompt[:-1], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        offset = float(logp[newline[0]])
        for label in item.labels:
            diff = b["label_logprobs"][label] - a["label_logprobs"][label]
            assert diff == pytest.approx(offset, abs=2e-4)
    assert (
        json.loads((both["hf"] / "summary.json").read_text())["per_class"]
        == json.loads((both["lm"] / "summary.json").read_text())["per_class"]
    )


def test_manifest_records_harness_and_guard_tells_backends_apart(
    both: dict[str, Path], tmp_path: Path
) -> None:
    manifest = json.loads((both["lm"] / "manifest.json").read_text())
    record = manifest["lm_eval"]
    import lm_eval

    assert record["version"] == lm_eval.__version__
    task = record["tasks"]["mini_mmlu"]
    assert task["n_samples"] == 32 and len(task["config_sha256"]) == 64
    protocol = manifest["protocol"]
    hf_protocol = json.loads((both["hf"] / "manifest.json").read_text())["protocol"]
    assert protocol["item_set_sha256"] == hf_protocol["item_set_sha256"]
    assert protocol["capability_prompt_sha256"] == record["config_sha256"]
    assert hf_protocol["capability_prompt_sha256"] == capability.prompt_sha256()
    assert manifest["inputs"]["task"]["sha256"] and manifest["inputs"]["data_files.test"]["sha256"]
    cmp = ["compare-items", str(both["hf"]), str(both["lm"])]
    r = CliRunner().invoke(app, cmp)
    assert r.exit_code == 3 and "capability_scorer" in r.stderr
    allow = ["--allow-diff", "backend", "--allow-diff", "capability_scorer"]
    allow += ["--allow-diff", "capability_prompt_sha256", "--out", str(tmp_path / "cmp")]
    r = CliRunner().invoke(app, [*cmp, *allow])
    assert r.exit_code == 0, r.output
    overall = json.loads((tmp_path / "cmp" / "compare_items.json").read_text())["pairs"][0]
    assert overall["overall"]["a_only"] == overall["overall"]["b_only"] == 0  # no flips


def test_without_the_extra_one_line_exit_2(
    prepared_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    out = tmp_path / "cap"
    argv = ["eval-capability", "--backend", "lm-eval", "--task", TASK, "--out", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        "error: --backend lm-eval needs EleutherAI's lm-evaluation-harness: "
        "pip install 'persona-cli[lm-eval]'"
    ]


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("task: t\noutput_type: generate_until\n", "output_type 'generate_until'"),
        ("output_type: multiple_choice\n", "no 'task' name"),
        (
            "task: t\noutput_type: multiple_choice\ndataset_path: json\n"
            "dataset_kwargs:\n  data_files:\n    test: missing.jsonl\n",
            "data_files test: no file",
        ),
    ],
)
def test_bad_task_yaml_is_one_line(tmp_path: Path, yaml: str, message: str) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(yaml)
    out = tmp_path / "cap"
    argv = ["eval-capability", "--backend", "lm-eval", "--task", str(task), "--out", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert f"{task}: " in r.stderr and message in r.stderr and not out.exists()


def test_unknown_task_name_is_one_line(prepared_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "cap"
    argv = ["eval-capability", "--backend", "lm-eval", "--task", "no_such_task", "--out", str(out)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "--task no_such_task: not a task, group or tag the harness knows" in r.stderr
    assert not out.exists()


def test_task_description_opens_the_first_user_turn() -> None:
    history = [
        {"role": "system", "content": "The following are questions.\n\n"},
        {"role": "user", "content": "Q1?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2?"},
    ]
    assert harness.fold_description(history) == [
        {"role": "user", "content": "The following are questions.\n\nQ1?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2?"},
    ]
    assert history[1]["content"] == "Q1?"  # the harness's list is left as it was
    assert harness.fold_description(history[1:]) == history[1:]
