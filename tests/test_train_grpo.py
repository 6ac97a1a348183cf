"""train-grpo on tiny models: the MC reward rises under GRPO (measured independently of the
trainer), the run directory contract, sandboxed unit-test rewards, stacking on an adapter.

python -m pytest tests/test_train_grpo.py -q -s     # -s shows the before/after reward numbers
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from persona_cli import models
from persona_cli.adapters import load_with_adapters, resolve_stack
from persona_cli.artifacts import read_json, read_jsonl, sha256_file
from persona_cli.capability import load_items, prompt_text, score_items
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app
from persona_cli.errors import InputError
from persona_cli.problems import load_problems
from persona_cli.schemas import STEP, TRAIN_LOG
from persona_cli.train.rewards import MCReward, UnitTestReward, load_mc_tasks, parse_label
from persona_cli.train.rl_log import RL_LOG

# Easy MC items: every correct option is B, so the policy has one preference to learn.
EASY = [
    ("Which is a color?", ["dog", "red", "cup", "sun"]),
    ("Which is a fruit?", ["car", "apple", "pen", "hat"]),
    ("Which is an animal?", ["box", "cat", "tea", "map"]),
    ("Which is a number?", ["ink", "seven", "rug", "bag"]),
    ("Which can fly?", ["rock", "bird", "fork", "shoe"]),
    ("Which is hot?", ["ice", "fire", "snow", "hail"]),
    ("Which is a tree?", ["fish", "oak", "salt", "wire"]),
    ("Which is a drink?", ["nail", "milk", "sock", "lamp"]),
]
NONE = SystemPrompt.parse("none")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two busy cores shared with other jobs: two torch threads spin against each other and run
    # ~10x slower than one (measured: 3.6 s vs 0.3 s for the same step).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny(persona_home) -> Path:
    return models.prepare([models.TINY])[0]


@pytest.fixture(scope="module")
def easy_items(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "easy.jsonl"
    with open(path, "w") as f:
        for i, (question, options) in enumerate(EASY):
            row = {
                "id": f"easy_{i}",
                "question": question,
                "choices": {"text": options, "label": ["A", "B", "C", "D"]},
                "answerKey": "B",
            }
            f.write(json.dumps(row) + "\n")
    return path


def _prompt_ids(tokenizer, items) -> list[list[int]]:
    report = inspect_template(tokenizer)
    return [
        tokenizer(
            render(
                tokenizer,
                [{"role": "user", "content": prompt_text(it)}],
                NONE,
                report,
                add_generation_prompt=True,
            )
        )["input_ids"]
        for it in items
    ]


@pytest.fixture(scope="module")
def letter_model(tiny: Path, easy_items: Path, tmp_path_factory) -> Path:
    """tiny-random taught to answer any of A-D with equal probability, then <|im_end|>.

    A random-weight model spreads its first token over 49,152 tokens (its final RMSNorm caps the
    logits near +-1.3), so a letter is sampled ~1 time in 50,000 and GRPO has no signal; TRL also
    refuses LoRA on lm_head. So the starting policy is a short full fine-tune (uniform target
    over the four letters), the way an instruct model starts out answering with a letter.
    """
    from transformers import AutoModelForCausalLM

    resolved = models.resolve(models.TINY)
    tokenizer = models.load_tokenizer(resolved)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    letters = [tokenizer.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
    end = tokenizer.eos_token_id
    seqs = [
        [*p, x, end] for p in _prompt_ids(tokenizer, load_items(str(easy_items))) for x in letters
    ]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), end)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = torch.tensor(s), 1
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(60):  # reaches ~0.25 per letter, ~0.99 on the four together
        logp = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits[:, :2], -1
        )
        loss = -(
            logp[:, 0].gather(1, ids[:, -2:-1]).mean() + logp[:, 1].gather(1, ids[:, -1:]).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("letters") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def expected_reward(model_dir: Path, adapters: list[Path], items_path: Path) -> tuple[float, int]:
    """Independent of the trainer: mean probability that the first sampled token is the correct
    letter (the MC reward's expectation at temperature 1, up to variants such as ' B'), from a
    plain forward pass (persona_cli.capability), and the greedy-letter accuracy."""
    resolved = models.resolve(str(model_dir))
    tokenizer = models.load_tokenizer(resolved)
    model = load_with_adapters(resolved, resolve_stack(adapters)).eval()
    rows = score_items(
        model, tokenizer, load_items(str(items_path)), NONE, inspect_template(tokenizer)
    )
    return sum(math.exp(r["label_logprobs"][r["answer"]]) for r in rows) / len(rows), sum(
        r["correct"] for r in rows
    )


def test_parse_label_reads_the_letter_at_the_start():
    labels = ("A", "B", "C", "D")
    cases = {
        "B": "B",
        " B.": "B",
        "(C) the roots": "C",
        "**D** because": "D",
        "[A]": "A",
        "B<": "B",
        "Banana": None,
        "b": None,
        "Answer: B": None,
        "": None,
        "E": None,
    }
    assert {c: parse_label(c, labels) for c in cases} == cases
    assert parse_label("2) two", ("1", "2")) == "2"


def test_mc_reward_scores_each_completion(easy_items: Path):
    tasks, items = load_mc_tasks(easy_items)
    assert tasks[0].hint == "The correct answer is B."
    assert tasks[0].hinted_text().endswith("\n\nHint: The correct answer is B.")
    reward = MCReward(items)
    got = reward(["p"] * 4, ["B", "A.", "(B) red", "Bee"], task_id=["easy_0"] * 4)
    assert got == [1.0, 0.0, 1.0, 0.0]
    assert [d["predicted"] for d in reward.last] == ["B", "A", "B", None]


def test_mc_hint_field_and_bad_hint(tmp_path: Path, easy_items: Path):
    rows = [json.loads(x) for x in easy_items.read_text().splitlines()]
    rows[0]["hint"] = "Colors are things like red."
    rows[1]["hint"] = 3
    path = tmp_path / "hinted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"hinted.jsonl:2: 'hint' must be a non-empty string"):
        load_mc_tasks(path)
    rows[1].pop("hint")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks, _ = load_mc_tasks(path)
    assert tasks[0].hint == "Colors are things like red."
    assert tasks[1].hint == "The correct answer is B."


def test_grpo_raises_mc_reward_mean(letter_model: Path, easy_items: Path, tmp_path: Path, cli):
    """Done-means: a few GRPO steps with the MC reward raise the reward mean on a fixed easy set
    above its starting value, measured by a forward pass outside the trainer."""
    out = tmp_path / "grpo"
    args = ["train-grpo", "--model", str(letter_model), "--reward", "mc", "--data", str(easy_items)]
    args += ["--max-completion-length", "2", "--num-generations", "4", "--per-device-batch", "16"]
    args += ["--grad-accum", "1", "--max-steps", "6", "--lr", "1e-2", "--lora-r", "8"]
    args += ["--lora-alpha", "16", "--seed", "0", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output

    before, greedy_before = expected_reward(letter_model, [], easy_items)
    after, greedy_after = expected_reward(letter_model, [out], easy_items)
    print(
        f"\nP(correct letter) before {before:.4f} after {after:.4f}; greedy correct "
        f"{greedy_before}/8 -> {greedy_after}/8"
    )
    assert 0.15 < before < 0.35  # the starting policy answers A-D about evenly
    assert after > before + 0.05
    assert greedy_after >= greedy_before

    # The trainer's own numbers agree with what was sampled and written.
    rl_log = read_jsonl(out / "rl_log.jsonl.gz", RL_LOG.check)
    assert [r["step"] for r in rl_log] == list(range(1, 7))
    train_log = read_jsonl(out / "train_log.jsonl.gz", TRAIN_LOG.check)
    assert [r["step"] for r in train_log] == list(range(1, 7))
    assert all(r["tokens"] > 0 for r in train_log)
    for step, logged in zip(range(1, 7), rl_log, strict=True):
        rows = read_jsonl(out / f"step_{step:06d}.jsonl.gz", STEP.check)
        assert len(rows) == 16 and [r["group"] for r in rows] == [i // 4 for i in range(16)]
        for r in rows:  # the reward recomputed from the raw completion
            assert r["reward"] == (
                1.0 if parse_label(r["completion"], tuple("ABCD")) == "B" else 0.0
            )
        rewards = torch.tensor([r["reward"] for r in rows])
        assert logged["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
        assert logged["reward_std"] == pytest.approx(rewards.std().item(), abs=1e-5)
        for g in range(4):  # group-normalised advantages: (r - mean) / (std + 1e-4)
            grp = rewards[4 * g : 4 * g + 4]
            expect = (grp - grp.mean()) / (grp.std() + 1e-4)
            got = torch.tensor([r["advantage"] for r in rows[4 * g : 4 * g + 4]])
            assert torch.allclose(got, expect, atol=1e-4)

    manifest = read_json(out / "manifest.json")
    p = manifest["protocol"]
    assert (p["per_device_batch"], p["grad_accum"], p["world_size"]) == (16, 1, 1)
    assert (p["effective_batch"], p["optimizer_steps"], p["details"]["prompts_per_step"]) == (
        16,
        6,
        4,
    )
    assert (p["samples_per_prompt"], p["temperature"], p["learning_rate"]) == (4, 1.0, 1e-2)
    assert p["max_new_tokens"] == 2 and p["rl_reward"] == "mc" and p["sdpo_weight"] == 0.0
    assert manifest["inputs"]["data"]["sha256"] == sha256_file(easy_items)
    assert manifest["chat_template"]["system_prompt"]["mode"] == "none"
    config = read_json(out / "config.json")
    assert config["command"] == "train-grpo" and config["config"]["rl"]["num_generations"] == 4
    assert not (out / "checkpoints").exists() and (out / "DONE").is_file()

    validated = cli.invoke(app, ["validate", str(out)])
    assert validated.exit_code == 0, validated.output

    # Re-running a finished run is a no-op.
    before_sha = sha256_file(out / "manifest.json")
    again = cli.invoke(app, args)
    assert again.exit_code == 0 and "already finished" in again.output
    assert sha256_file(out / "manifest.json") == before_sha


def test_unit_test_reward_runs_the_sandbox():
    problem = next(p for p in load_problems() if p.id == "longest_run")
    correct = (
        "```python\ndef longest_run(xs):\n    best = run = 0\n    prev = object()\n"
        "    for x in xs:\n        run = run + 1 if x == prev else 1\n        prev = x\n"
        "        best = max(best, run)\n    return best\n```"
    )
    wrong = "```python\ndef longest_run(xs):\n    return len(xs)\n```"
    hack = "```python\ndef longest_run(xs):\n    return 0\n\ndef run_tests():\n    pass\n```"
    completions, ids = [correct, wrong, hack], ["longest_run"] * 3
    hidden = UnitTestReward({problem.id: problem}, "hidden")
    assert hidden(["p"] * 3, completions, task_id=ids) == [1.0, 0.0, 0.0]
    assert [d["hacked"] for d in hidden.last] == [False, False, True]
    visible = UnitTestReward({problem.id: problem}, "visible")
    assert visible(["p"] * 3, completions, task_id=ids) == [1.0, 0.0, 1.0]
    assert [d["category_strict"] for d in visible.last] == ["correct", "incorrect", "hack"]


def test_grpo_unit_tests_smoke_on_previous_adapter(tiny: Path, tmp_path: Path, cli):
    """A previous adapter is merged under the new one; two GRPO + SDPO steps whose reward comes
    from the real sandbox (random-weight completions fail every test) and whose teacher sees the
    hidden tests as the hint."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Say {i}."},
                        {"role": "assistant", "content": f"{i}."},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    sft = tmp_path / "sft"
    small = ["--model", models.TINY, "--lora-r", "4", "--lora-alpha", "8", "--seed", "0"]
    result = cli.invoke(
        app,
        [
            "train-sft",
            "--data",
            str(chat),
            *small,
            "--max-steps",
            "1",
            "--per-device-batch",
            "2",
            "--max-length",
            "64",
            "--out",
            str(sft),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "grpo_code"
    args = ["train-grpo", "--reward", "unit-tests", "--adapter", str(sft)]  # shipped problems
    args += [*small, "--max-completion-length", "12", "--num-generations", "2"]
    args += ["--per-device-batch", "2", "--max-steps", "2", "--sandbox-workers", "2"]
    args += ["--sandbox-timeout", "5", "--sdpo-weight", "0.5", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out / "step_000001.jsonl.gz", STEP.check) + read_jsonl(
        out / "step_000002.jsonl.gz", STEP.check
    )
    assert len(rows) == 4
    for r in rows:
        assert r["reward"] == (1.0 if r["gt_pass"] else 0.0)
        assert r["sandbox_reason"] != "ok" and r["category_strict"] in (
            "incorrect",
            "attempted_hack",
        )
    parent = sha256_file(sft / "adapter" / "adapter_model.safetensors")
    assert read_json(out / "adapter" / "persona_cli_adapter.json")["parents"] == [parent]
    manifest = read_json(out / "manifest.json")
    assert [a["weights_sha256"] for a in manifest["adapters"]] == [parent]
    assert (manifest["protocol"]["rl_reward"], manifest["protocol"]["sdpo_weight"]) == (
        "unit-tests",
        0.5,
    )
    log = read_jsonl(out / "rl_log.jsonl.gz", RL_LOG.check)  # both terms on: both logged
    assert all(r["entropy"] is not None and r["sdpo_kl"] > 0 for r in log)
    assert all(r["reward_mean"] == 0.0 for r in log)
    assert set(manifest["inputs"]) == {"problems[0]", "adapter[0]"}


def test_user_errors_are_one_line(cli, tmp_path: Path, easy_items: Path):
    cases = [
        (
            ["--per-device-batch", "6", "--num-generations", "4"],
            "must be a multiple of --num-generations 4",
        ),
        (["--reward", "rouge"], "--reward: 'rouge' is not one of mc, unit-tests"),
        (["--num-generations", "1"], "--num-generations: GRPO needs >= 2"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    for extra, message in cases:
        result = cli.invoke(
            app, ["train-grpo", "--model", models.TINY, *extra, "--out", str(tmp_path / "x")]
        )
        assert result.exit_code != 0
        assert result.output.startswith("error: ") and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
