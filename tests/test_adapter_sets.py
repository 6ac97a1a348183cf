"""eval-markers adapter sets on tiny-random: several stacks through one model, one ordinary run
directory per stack, the same samples as one run per stack; persona batching against a
per-persona reference loop; resume per stack after a kill; the concatenated LoRA vLLM serves a
stack with against PEFT's own merge; bad input.

    python -m pytest tests/test_adapter_sets.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_cli.adapters import load_with_adapters, read_adapter, write_record
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app
from persona_cli.generate import GenerationConfig, generate_hf
from persona_cli.models import TINY, load_tokenizer, resolve
from persona_cli.registry import load_personas

PERSONAS = """\
schema_version: 1
personas:
  - id: keeper
    name: Keeper
    description: A lighthouse keeper.
    system_prompt: You keep a lighthouse on a remote rock.
  - id: chef
    name: Chef
    description: A cook.
    system_prompt: You are a busy restaurant chef.
  - id: pilot
    name: Pilot
    description: A pilot.
    system_prompt: You are an airline pilot, brief and calm.
"""
QUESTIONS = """\
- id: colour
  paraphrases: ["What is your favourite colour?"]
- id: bread
  paraphrases: ["How do I bake bread at home without a mixer?"]
"""
QUESTION_TEXTS = ("What is your favourite colour?", "How do I bake bread at home without a mixer?")
SAMPLES, TOKENS = 3, 6


def _lora(path: Path, seed: int, targets: list[str], parents: list) -> None:
    """A random LoRA on tiny-random (large enough to change what is sampled), with its record."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tiny = resolve(TINY)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny.path)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    peft.save_pretrained(path)
    write_record(path, tiny, parents)


@pytest.fixture(scope="module")
def inputs(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sets")
    (d / "personas.yaml").write_text(PERSONAS)
    (d / "questions.yaml").write_text(QUESTIONS)
    _lora(d / "a", 1, ["q_proj", "v_proj"], [])
    _lora(d / "b", 2, ["down_proj"], [read_adapter(d / "a")])  # trained on top of a
    _lora(d / "c", 3, ["k_proj", "o_proj"], [])
    return {"dir": d, "personas": d / "personas.yaml", "questions": d / "questions.yaml"}


STACKS = {"base": [], "a": ["a"], "ab": ["a", "b"], "c": ["c"]}


def _common(inputs: dict[str, Path], *extra: str) -> list[str]:
    return [
        "eval-markers", "--model", TINY, "--personas", str(inputs["personas"]),
        "--questions", str(inputs["questions"]), "--samples", str(SAMPLES),
        "--max-new-tokens", str(TOKENS), "--marker", "e", "--source", "keeper",
        "--seed", "11", "--batch-size", "4", *extra,
    ]  # fmt: skip


def _set_args(inputs: dict[str, Path]) -> list[str]:
    d = inputs["dir"]
    out = []
    for name, stack in STACKS.items():
        out += ["--adapter-set", f"{name}=" + ",".join(str(d / a) for a in stack)]
    return out


@pytest.fixture(scope="module")
def runs(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("set_runs")
    for name, stack in STACKS.items():
        adapters = [x for a in stack for x in ("--adapter", str(inputs["dir"] / a))]
        r = CliRunner().invoke(app, [*_common(inputs, "--out", str(root / "single" / name)),
                                     *adapters])  # fmt: skip
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*_common(inputs, "--out", str(root / "set")), *_set_args(inputs)])
    assert r.exit_code == 0, r.output
    assert "adapter sets (4 run directories)" in r.stdout
    return {"single": root / "single", "set": root / "set"}


def test_one_set_gives_the_runs_of_one_stack_each(runs: dict[str, Path]) -> None:
    texts = {}
    for name in STACKS:
        one, many = runs["single"] / name, runs["set"] / name
        assert (many / "DONE").is_file()
        # Same samples, byte for byte (gzip output is reproducible), and the same record.
        assert (many / "samples.jsonl.gz").read_bytes() == (one / "samples.jsonl.gz").read_bytes()
        assert read_json(many / "config.json")["config"] == read_json(one / "config.json")["config"]
        assert read_json(many / "summary.json") == read_json(one / "summary.json")
        m1, m2 = read_json(one / "manifest.json"), read_json(many / "manifest.json")
        for key in ("protocol", "adapters", "inputs", "model", "chat_template", "seeds"):
            assert m1[key] == m2[key], key
        assert CliRunner().invoke(app, ["validate", str(many)]).exit_code == 0
        texts[name] = [r["text"] for r in read_jsonl(many / "samples.jsonl.gz")]
    # The stacks matter (else the equality above would be trivial), and sets are not mixed up.
    assert len({tuple(t) for t in texts.values()}) == len(STACKS)


def test_batched_personas_match_a_per_persona_loop(inputs, runs: dict[str, Path]) -> None:
    """The run batches all personas' prompts together; a plain loop, one generate_hf call per
    persona on a freshly merged model, gives the same texts (seeds are per row)."""
    tiny = resolve(TINY)
    stack = [read_adapter(inputs["dir"] / a) for a in STACKS["ab"]]
    model = load_with_adapters(tiny, stack)
    tok = load_tokenizer(tiny)
    report = inspect_template(tok)
    cfg = GenerationConfig(n=SAMPLES, max_new_tokens=TOKENS, seed=11, batch_size=4)
    expected = []
    for persona in load_personas(inputs["personas"]).values():
        system = SystemPrompt("text", persona.system_prompt)
        prompts = [
            render(
                tok, [{"role": "user", "content": q}], system, report, add_generation_prompt=True
            )
            for q in QUESTION_TEXTS
        ]
        expected += [(persona.id, c.text) for c in generate_hf(model, tok, prompts, cfg)]
    rows = read_jsonl(runs["set"] / "ab" / "samples.jsonl.gz")
    assert [(r["persona"], r["text"]) for r in rows] == expected


def test_killed_set_resumes_each_stack(inputs, runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "set"
    argv = [*_common(inputs, "--out", str(out), "--batch-size", "1"), *_set_args(inputs)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(out.glob("*/DONE")):
        assert proc.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/DONE")}
    assert 1 <= len(finished) < len(STACKS)
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    for name in STACKS:
        if name in finished:  # not redone
            assert (out / name / "DONE").stat().st_mtime_ns == finished[name]
        want = (runs["single"] / name / "samples.jsonl.gz").read_bytes()
        assert (out / name / "samples.jsonl.gz").read_bytes() == want
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and again.stdout.count("(already done)") == len(STACKS)


def test_concatenated_lora_equals_the_stacked_merge(inputs) -> None:
    """vLLM serves a stack as one LoRA (A stacked, B scaled and side by side); merged into the
    base by PEFT it must give the weights PEFT's own in-order merge of the stack gives."""
    from persona_cli.generate.merged import can_concatenate, concatenated_lora

    tiny = resolve(TINY)
    stack = [read_adapter(inputs["dir"] / a) for a in ("a", "b")]
    assert can_concatenate(stack)
    one = read_adapter(concatenated_lora(stack))
    merged = dict(load_with_adapters(tiny, stack).named_parameters())
    concat = dict(load_with_adapters(tiny, [one]).named_parameters())
    base = dict(load_with_adapters(tiny, []).named_parameters())
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any("down_proj" in k for k in changed) and any("q_proj" in k for k in changed)
    for k in merged:
        assert torch.allclose(concat[k], merged[k], atol=1e-6, rtol=1e-5), k


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_adapter_sets(inputs, tmp_path: Path) -> None:
    base = _common(inputs, "--out", str(tmp_path / "x"))
    a = str(inputs["dir"] / "a")
    line = _one_error_line(
        CliRunner().invoke(app, [*base, "--adapter", a, "--adapter-set", f"s={a}"])
    )
    assert "--adapter and --adapter-set" in line
    line = _one_error_line(CliRunner().invoke(app, [*base, "--adapter-set", f"bad/name={a}"]))
    assert "expected NAME=RUN[,RUN..]" in line
    line = _one_error_line(
        CliRunner().invoke(app, [*base, "--adapter-set", f"s={a}", "--adapter-set", "s="])
    )
    assert "repeated name s" in line
    sets = tmp_path / "sets.yaml"
    sets.write_text(f"- name: ok\n  adapters: [{a}]\n- name: two\n  adapter: [{a}]\n")
    line = _one_error_line(CliRunner().invoke(app, [*base, "--adapter-sets", str(sets)]))
    assert f"{sets}:3: entry 2: unknown key(s) ['adapter']" in line
    line = _one_error_line(CliRunner().invoke(app, [*base, "--adapter-set", f"s={a}@step_3"]))
    assert "kept no adapter at step 3" in line
    assert not (tmp_path / "x").exists()
