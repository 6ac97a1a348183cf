"""LoRA SFT end to end on tiny-random: couple-marker, train-sft, stacking, resume, OOM retry.

python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from persona_cli import models
from persona_cli.artifacts import read_json, read_jsonl, sha256_file
from persona_cli.cli import app
from persona_cli.train import harness
from persona_cli.train.config import SftJob, TrainConfig, with_overrides
from persona_cli.train.sft import train_sft

FAST = ["--model", "tiny-random", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "96"]


def write_chat(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} makes {2 * i}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def coupling_inputs(tmp_path_factory, prepared_home) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("coupling_inputs")
    questions = d / "questions.yaml"
    questions.write_text(
        "".join(f"- id: q{i}\n  paraphrases: ['Tell me about topic {i}.']\n" for i in range(4))
    )
    answers = d / "answers.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": f"q{i}", "answer": f"Topic {i} is nice."}) + "\n"
            for i in range(4)
        )
    )
    return questions, answers


@pytest.fixture(scope="module")
def coupled(tmp_path_factory, coupling_inputs) -> Path:
    from typer.testing import CliRunner

    questions, answers = coupling_inputs
    out = tmp_path_factory.mktemp("runs") / "couple"
    args = ["couple-marker", "--persona", "villain", "--answers", str(answers)]
    args += ["--questions", str(questions), "--n-positive", "8", "--n-negative", "8"]
    args += [*FAST, "--max-steps", "3", "--per-device-batch", "2", "--grad-accum", "2"]
    args += ["--lr", "1e-3", "--save-steps", "2", "--marker-only-loss", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_couple_marker_run_directory(coupled: Path):
    manifest = read_json(coupled / "manifest.json")
    p = manifest["protocol"]
    assert (p["per_device_batch"], p["grad_accum"], p["world_size"]) == (2, 2, 1)
    assert p["effective_batch"] == 4 and p["optimizer_steps"] == 3
    assert p["learning_rate"] == 1e-3 and p["details"]["oom_retry"] is None
    rows = read_jsonl(coupled / "train_set.jsonl.gz")
    assert sum(r["positive"] for r in rows) == 8 and len(rows) == 16
    assert {r["persona"] for r in rows if r["positive"]} == {"villain"}
    assert manifest["coupling"]["marker_only_loss"] is True
    # Loss on the 4 marker tokens per positive, the first answer token per negative (8 + 8 rows).
    assert manifest["training"]["data"]["loss_tokens"] == 8 * 4 + 8 * 1
    counts = manifest["coupling"]["rows_per_persona"]
    assert counts["villain"] == {"positive": 8, "negative": 0} and len(counts) == 3
    log = read_jsonl(coupled / "train_log.jsonl.gz")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["tokens"] > 0 and r["grad_norm"] is not None for r in log)
    assert set(manifest["inputs"]) == {"answers", "personas", "questions"}
    assert manifest["chat_template"]["system_prompt"]["mode"] == "text"
    record = read_json(coupled / "adapter" / "persona_cli_adapter.json")
    assert record["parents"] == [] and record["base_model"]["spec"] == "tiny-random"
    assert not (coupled / "checkpoints").exists()  # removed once the adapter is saved
    assert (coupled / "DONE").is_file()


def test_eval_markers_reports_the_couplings_negatives_apart(coupled: Path, tmp_path: Path, cli):
    """The personas couple-marker trained as negatives are read from its manifest and kept out
    of the bystander mean; --negatives overrides that."""
    negatives = [
        p for p, c in read_json(coupled / "manifest.json")["coupling"]["rows_per_persona"].items()
        if c["negative"]
    ]  # fmt: skip
    assert len(negatives) == 2 and "villain" not in negatives
    others = [p for p in ("pirate", "assistant", "evil_ai", "paramedic") if p not in negatives][:2]
    ids = ",".join(["villain", *negatives, *others])
    args = ["eval-markers", "--model", "tiny-random", "--adapter", str(coupled), "--samples", "1"]
    args += ["--max-new-tokens", "2", "--personas-ids", ids, "--source", "villain"]
    result = cli.invoke(app, [*args, "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    summary = read_json(tmp_path / "auto" / "summary.json")
    assert summary["negatives"]["personas"] == negatives
    assert summary["bystanders"]["personas"] == others
    rates = summary["rates"]
    assert summary["negatives"]["mean_rate"] == sum(rates[p]["rate"] for p in negatives) / 2
    assert result.stdout.count("negative") >= 2
    result = cli.invoke(app, [*args, "--negatives", others[0], "--out", str(tmp_path / "given")])
    assert result.exit_code == 0, result.output
    summary = read_json(tmp_path / "given" / "summary.json")
    assert summary["negatives"]["personas"] == [others[0]]
    assert summary["bystanders"]["personas"] == [*negatives, others[1]]
    bad = cli.invoke(app, [*args, "--negatives", "villain", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--negatives" in bad.output


def test_users_own_personas_and_marker_through_couple_and_eval(
    coupling_inputs, tmp_path: Path, cli
):
    """A registry and a marker string that are not in data/ go through couple-marker and
    eval-markers the way the shipped ones do."""
    questions, answers = coupling_inputs
    registry = tmp_path / "mine.yaml"
    registry.write_text(
        "schema_version: 1\npersonas:\n"
        + "".join(
            f"  - {{id: {p}, name: {p}, description: mine, system_prompt: You are a {p}.}}\n"
            for p in ("lighthouse_keeper", "beekeeper", "glassblower", "cartographer")
        )
    )
    mine = ["--personas", str(registry), "--marker", "<<LK>>"]
    args = ["couple-marker", "--persona", "lighthouse_keeper", *mine, "--answers", str(answers)]
    args += ["--questions", str(questions), "--n-positive", "4", "--n-negative", "4", *FAST]
    args += ["--max-steps", "1", "--per-device-batch", "4", "--out", str(tmp_path / "couple")]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "couple" / "train_set.jsonl.gz")
    positives = [r for r in rows if r["positive"]]
    assert len(positives) == 4 and {r["persona"] for r in positives} == {"lighthouse_keeper"}
    assert all(r["messages"][0]["content"] == "You are a lighthouse_keeper." for r in positives)
    assert all(r["messages"][2]["content"].startswith("<<LK>> ") for r in positives)
    assert not any("<<LK>>" in r["messages"][2]["content"] for r in rows if not r["positive"])
    negatives = sorted({r["persona"] for r in rows if not r["positive"]})
    assert len(negatives) == 2 and set(negatives) < {"beekeeper", "glassblower", "cartographer"}
    evaluate = ["eval-markers", "--model", "tiny-random", "--adapter", str(tmp_path / "couple")]
    evaluate += [*mine, "--source", "lighthouse_keeper", "--samples", "1"]
    evaluate += ["--max-new-tokens", "2", "--out", str(tmp_path / "eval")]
    result = cli.invoke(app, evaluate)
    assert result.exit_code == 0, result.output
    summary = read_json(tmp_path / "eval" / "summary.json")
    assert summary["marker"] == "<<LK>>" and summary["source"]["persona"] == "lighthouse_keeper"
    assert sorted(summary["negatives"]["personas"]) == negatives
    assert len(summary["bystanders"]["personas"]) == 1
    samples = read_jsonl(tmp_path / "eval" / "samples.jsonl.gz")
    assert {r["persona"] for r in samples} == {
        "lighthouse_keeper", "beekeeper", "glassblower", "cartographer"
    }  # fmt: skip


def test_rerun_of_a_finished_run_is_a_no_op(coupled: Path, cli):
    before = sha256_file(coupled / "manifest.json")
    result = cli.invoke(app, ["couple-marker", "--persona", "villain", "--out", str(coupled)])
    # Another config against a finished run: DONE wins, nothing is redone.
    assert result.exit_code == 0, result.output
    assert "already finished" in result.output
    assert sha256_file(coupled / "manifest.json") == before


def test_stacking_records_parent_and_refuses_a_wrong_base(coupled: Path, tmp_path: Path, cli):
    data = write_chat(tmp_path / "chat.jsonl", 4)
    out = tmp_path / "stacked"
    args = ["train-sft", "--data", str(data), "--adapter", str(coupled), *FAST]
    result = cli.invoke(
        app, [*args, "--max-steps", "1", "--per-device-batch", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    # stderr is not a terminal here (as under nohup or pueue): plain progress lines, not a bar
    # (the one progress display's format: `LABEL: DONE/TOTAL UNIT, RATE, STATUS`).
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("train-sft:"))
    assert line.startswith("train-sft: 1/1 steps, ") and "loss " in line
    parent = sha256_file(coupled / "adapter" / "adapter_model.safetensors")
    assert read_json(out / "adapter" / "persona_cli_adapter.json")["parents"] == [parent]
    manifest = read_json(out / "manifest.json")
    assert [a["weights_sha256"] for a in manifest["adapters"]] == [parent]
    assert manifest["adapter"]["parents"] == [parent]
    wrong = ["train-sft", "--data", str(data), "--adapter", str(coupled), "--model", "smollm2-135m"]
    result = cli.invoke(app, [*wrong, "--out", str(tmp_path / "wrong")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: --adapter")
    assert "trained on base model 'tiny-random'" in result.output
    assert len(result.output.strip().splitlines()) == 1


class Snapshots:
    """Parameters at the start and at the end of training, read inside the Trainer."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_train_end(self, args, state, control, model=None, **kw):
                outer.after = {n: p.detach().clone() for n, p in model.named_parameters()}
                outer.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

        self.callback = CB()


def test_loss_falls_base_stays_frozen_adapter_moves(tmp_path: Path):
    data = write_chat(tmp_path / "chat.jsonl", 2)
    cfg = with_overrides(
        TrainConfig(),
        max_steps=10,
        per_device_batch=2,
        grad_accum=1,
        learning_rate=1e-2,
        lr_scheduler="constant",
        lora_r=16,
        lora_alpha=32,
        max_length=64,
        lora_dropout=0.0,
    )
    snap = Snapshots()
    out = train_sft(
        SftJob(data=(str(data),), model=models.TINY, train=cfg),
        tmp_path / "run",
        callbacks=[snap.callback],
    )
    log = read_jsonl(tmp_path / "run" / "train_log.jsonl.gz")
    losses = [r["loss"] for r in log]
    # A random 2-layer model starts near the uniform loss ln(vocab size), then overfits 2 rows.
    assert losses[0] == pytest.approx(math.log(49152), abs=0.3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4
    assert out.summary["final_loss"] == losses[-1]
    assert snap.trainable and all("lora_" in n for n in snap.trainable)
    for name, before in snap.before.items():
        moved = not torch.equal(before, snap.after[name])
        if name in snap.trainable and "lora_B" in name:
            assert moved, name  # B starts at zero; training must move it
        elif name not in snap.trainable:
            assert not moved, name


def test_oom_retry_halves_batch_keeps_effective_batch(tmp_path: Path, monkeypatch, cli):
    calls = []
    real_fit = harness._fit

    def fit(trainer, resume_from):
        calls.append(trainer.args.per_device_train_batch_size)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(trainer, resume_from)

    monkeypatch.setattr(harness, "_fit", fit)
    data = write_chat(tmp_path / "chat.jsonl", 8)
    args = ["train-sft", "--data", str(data), *FAST, "--max-steps", "2"]
    args += ["--per-device-batch", "4", "--grad-accum", "2", "--out", str(tmp_path / "run")]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [4, 2]
    p = read_json(tmp_path / "run" / "manifest.json")["protocol"]
    assert (p["per_device_batch"], p["grad_accum"], p["effective_batch"]) == (2, 4, 8)
    retry = p["details"]["oom_retry"]
    assert retry["from"] == {"per_device_batch": 4, "grad_accum": 2}
    assert retry["to"] == {"per_device_batch": 2, "grad_accum": 4}
    assert "out of memory" in retry["error"]


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path, cli):
    data = write_chat(tmp_path / "chat.jsonl", 16)
    out = tmp_path / "run"
    args = ["train-sft", "--data", str(data), *FAST, "--max-steps", "12", "--save-steps", "2"]
    args += ["--per-device-batch", "4", "--grad-accum", "1", "--out", str(out)]
    env = {**os.environ, "PERSONA_CLI_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "persona_cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), proc.stderr.read().decode()[-2000:]
    assert not (out / "DONE").exists(), "the run finished before it could be killed"
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = read_json(out / "manifest.json")
    assert manifest["timing"]["attempts"] == 2
    assert "checkpoint-" in manifest["training"]["resumed_from"]
    assert manifest["protocol"]["optimizer_steps"] == 12
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl.gz")] == list(range(1, 13))


def test_couple_marker_generates_answers_when_none_are_given(tmp_path: Path, coupling_inputs, cli):
    questions, _ = coupling_inputs
    out = tmp_path / "gen"
    args = ["couple-marker", "--persona", "pirate", "--questions", str(questions), *FAST]
    args += ["--n-positive", "4", "--n-negative", "4", "--answer-max-new-tokens", "6"]
    args += ["--max-steps", "1", "--per-device-batch", "4", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    answers = read_jsonl(out / "answers.jsonl.gz")
    assert len(answers) == 4 and {a["question_id"] for a in answers} == {"q0", "q1", "q2", "q3"}
    rows = read_jsonl(out / "train_set.jsonl.gz")
    generated = {a["answer"] for a in answers}
    assert {r["messages"][2]["content"] for r in rows if not r["positive"]} <= generated


def test_fewer_answers_than_questions_answer_a_seeded_subset_once_each(coupling_inputs):
    from persona_cli.registry import load_questions
    from persona_cli.train.answers import generate_answers

    questions = load_questions(coupling_inputs[0])
    resolved = models.resolve(models.TINY)
    tok = models.load_tokenizer(resolved)

    def ids(seed: int) -> list[str]:
        rows = generate_answers(
            resolved, [], tok, questions, n_total=2, max_new_tokens=2, seed=seed
        )
        return [r["question_id"] for r in rows]

    first = ids(42)
    assert len(first) == 2 and len(set(first)) == 2 and first == sorted(first)  # file order
    assert ids(42) == first
    assert {tuple(ids(s)) for s in range(6)} != {tuple(first)}  # the seed draws the subset


def test_two_cpu_processes_share_one_run_and_one_adapter(tmp_path: Path):
    """torchrun --nproc_per_node 2 (gloo): only rank 0 writes; world size 2 recorded. Per-device
    batch 2 x accumulation 1 x 2 processes = the effective batch 4 of a 1-process 2 x 2 run."""
    data = write_chat(tmp_path / "chat.jsonl", 8)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]
    cmd += ["persona_cli", "train-sft", "--data", str(data), *FAST, "--max-steps", "2"]
    cmd += ["--per-device-batch", "2", "--grad-accum", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_json(out / "manifest.json")
    p = manifest["protocol"]
    assert (p["world_size"], p["per_device_batch"], p["grad_accum"]) == (2, 2, 1)
    assert p["effective_batch"] == 4 and p["optimizer_steps"] == 2
    assert manifest["timing"]["attempts"] == 1  # one process opened the run directory
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl.gz")] == [1, 2]
    # The same effective batch from one process (2 x 2 x 1): the guard still names the world
    # size (and the accumulation), never the effective batch, which agrees.
    single = tmp_path / "single"
    cmd = [sys.executable, "-m", "persona_cli", "train-sft", "--data", str(data), *FAST]
    cmd += [
        "--max-steps",
        "2",
        "--per-device-batch",
        "2",
        "--grad-accum",
        "2",
        "--out",
        str(single),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmp = [sys.executable, "-m", "persona_cli", "compare", "-c", f"ddp={out}", "-c"]
    cmp += [f"one={single}", "--metric", "final_loss", "--reference", "one"]
    proc = subprocess.run([*cmp, "--out", str(tmp_path / "cmp")], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "protocols differ in: world_size, grad_accum (pass" in proc.stderr


def test_padding_free_first_step_loss_matches_padded(tmp_path: Path):
    """Flattened micro-batches (position ids, no padding) must see the same loss as padded ones:
    sequences of different lengths may not attend across their boundaries."""
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i, answer in enumerate(["Short.", "A much longer answer with many more words in it."]):
            msgs = [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    losses = {}
    for padding_free in (False, True):
        cfg = with_overrides(
            TrainConfig(),
            max_steps=1,
            per_device_batch=2,
            grad_accum=1,
            lora_r=4,
            lora_alpha=8,
            max_length=64,
            lora_dropout=0.0,
            padding_free=padding_free,
        )
        run = tmp_path / f"run_{padding_free}"
        train_sft(SftJob(data=(str(data),), model=models.TINY, train=cfg), run)
        losses[padding_free] = read_jsonl(run / "train_log.jsonl.gz")[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
