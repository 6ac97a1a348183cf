"""Self-distillation (SDPO): the token-level KL term against an independent loop, and pure SDPO
(`train-sdpo`) pulling the un-hinted distribution toward the hinted one.

python -m pytest tests/test_train_sdpo.py -q -s
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax

from persona_cli import models
from persona_cli.adapters import load_with_adapters, resolve_stack
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.cli import app
from persona_cli.train.rewards import MCReward, load_mc_tasks
from persona_cli.train.rl_log import RL_LOG

NONE = SystemPrompt.parse("none")
ITEMS = [
    ("Which is a color?", ["dog", "red", "cup", "sun"], "B"),
    ("Which of these is a fruit you can eat?", ["apple", "car", "pen", "hat"], "A"),
    ("Which is an animal?", ["box", "tea", "map", "cat"], "D"),
    ("Which can fly?", ["rock", "fork", "bird", "shoe"], "C"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()  # see tests/test_train_grpo.py: busy shared cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny(persona_home) -> Path:
    return models.prepare([models.TINY])[0]


@pytest.fixture(scope="module")
def sharp(tiny: Path, tmp_path_factory) -> Path:
    """tiny-random's config and tokenizer with weights drawn at std 0.1 instead of 0.02: its
    next-token distributions depend on the context enough that a hint moves them measurably
    (KL ~0.04 at the first answer token; on tiny-random itself it is ~5e-5, below what a 1e-5
    tolerance can tell apart)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = models.resolve(models.TINY)
    config = AutoConfig.from_pretrained(resolved.path)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(out)
    models.load_tokenizer(resolved).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdpo") / "items.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"item_{i}",
                    "question": q,
                    "choices": {"text": opts, "label": list("ABCD")},
                    "answerKey": answer,
                }
            )
            + "\n"
            for i, (q, opts, answer) in enumerate(ITEMS)
        )
    )
    return path


def _texts(tokenizer, items_file: Path) -> tuple[list[str], list[str]]:
    """The rendered un-hinted and hinted prompts, as train-grpo builds them."""
    tasks, _ = load_mc_tasks(items_file)
    report = inspect_template(tokenizer)

    def one(text: str) -> str:
        return render(
            tokenizer, [{"role": "user", "content": text}], NONE, report, add_generation_prompt=True
        )

    return [one(t.user_text) for t in tasks], [one(t.hinted_text()) for t in tasks]


def loop_kl(model, student: list[int], teacher: list[int], completion: list[int]) -> list[float]:
    """Reference: for each completion token t, run the un-padded contexts prompt + y<t and
    hinted prompt + y<t one at a time, and sum p_s * log(p_s / p_t) over the vocabulary in
    float64 with scipy."""
    out = []
    for t in range(len(completion)):
        with torch.no_grad():
            s = model(input_ids=torch.tensor([student + completion[:t]])).logits[0, -1]
            h = model(input_ids=torch.tensor([teacher + completion[:t]])).logits[0, -1]
        p_s = softmax(s.double().numpy())
        p_t = softmax(h.double().numpy())
        out.append(float(rel_entr(p_s, p_t).sum()))
    return out


def test_kl_term_matches_an_independent_loop(sharp: Path, items_file: Path, tmp_path: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from persona_cli.train.sdpo import SelfDistillGRPOTrainer, left_pad, masked_mean, sdpo_kl

    resolved = models.resolve(str(sharp))
    tokenizer = models.load_tokenizer(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
    students, teachers = _texts(tokenizer, items_file)
    s_ids = [tokenizer(x)["input_ids"] for x in students[:2]]
    t_ids = [tokenizer(x)["input_ids"] for x in teachers[:2]]
    assert len({len(x) for x in s_ids}) == len({len(x) for x in t_ids}) == 2  # ragged padding

    # 1. The function on a hand-built ragged batch: left-padded prompts, right-padded
    #    completions of 5 and 3 tokens.
    completions = [[330, 4561, 28, 906, 2], [50, 2, 11]]
    pad = tokenizer.pad_token_id
    comp = torch.tensor([c + [pad] * (5 - len(c)) for c in completions])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (5 - len(c)) for c in completions])
    per_token = sdpo_kl(
        model, *left_pad(s_ids, pad, "cpu"), *left_pad(t_ids, pad, "cpu"), comp, comp_mask
    )
    reference = [loop_kl(model, s, t, c) for s, t, c in zip(s_ids, t_ids, completions, strict=True)]
    for b, ref in enumerate(reference):
        assert per_token[b, : len(ref)].tolist() == pytest.approx(ref, abs=1e-5, rel=1e-4)
        assert min(ref) > 1e-2  # the hint changes the next-token distribution
    flat = [v for ref in reference for v in ref]
    assert masked_mean(per_token, comp_mask).item() == pytest.approx(np.mean(flat), rel=1e-5)

    # 2. The trainer's loss on completions it sampled itself (teacher prompts tokenised and
    #    padded inside the trainer): weight x the same token mean.
    rows = [
        {"prompt": s, "teacher_prompt": t, "task_id": f"item_{i}"}
        for i, (s, t) in enumerate(zip(students, teachers, strict=True))
    ]
    _, items = load_mc_tasks(items_file)
    args = GRPOConfig(
        output_dir=str(tmp_path / "ckpt"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        use_cpu=True,
        bf16=False,
        report_to="none",
        seed=0,
    )
    trainer = SelfDistillGRPOTrainer(
        model=model,
        reward_funcs=[MCReward(items)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        grpo_weight=0.0,
        sdpo_weight=0.7,
    )
    trainer.model.eval()  # eval mode: no gradient-accumulation scaling of the loss
    batch = [rows[0], rows[0], rows[1], rows[1]]
    output = trainer._generate_and_score_completions(batch)
    loss = trainer.compute_loss(trainer.model, output)
    expected = []
    for row, ids, mask in zip(
        batch, output["completion_ids"], output["completion_mask"], strict=True
    ):
        completion = ids[mask.bool()].tolist()
        assert completion  # sampled tokens, not padding
        expected += loop_kl(
            model,
            tokenizer(row["prompt"])["input_ids"],
            tokenizer(row["teacher_prompt"])["input_ids"],
            completion,
        )
    assert loss.item() == pytest.approx(0.7 * np.mean(expected), abs=1e-5, rel=1e-5)
    assert trainer._metrics["eval"]["sdpo/kl"][-1] == pytest.approx(np.mean(expected), rel=1e-5)


def first_token_kl(model_dir: str, adapters: list[Path], items_file: Path) -> float:
    """Mean over items of KL(p(. | prompt) || p(. | hinted prompt)) at the first answer token,
    in float64 with scipy, from a plain forward pass of the merged model."""
    resolved = models.resolve(model_dir)
    tokenizer = models.load_tokenizer(resolved)
    model = load_with_adapters(resolved, resolve_stack(adapters)).eval()
    students, teachers = _texts(tokenizer, items_file)
    kls = []
    for s, t in zip(students, teachers, strict=True):
        kls += loop_kl(model, tokenizer(s)["input_ids"], tokenizer(t)["input_ids"], [0])[:1]
    return float(np.mean(kls))


def test_pure_sdpo_moves_unhinted_toward_hinted(sharp: Path, items_file: Path, tmp_path: Path, cli):
    out = tmp_path / "sdpo"
    args = ["train-sdpo", "--model", str(sharp), "--data", str(items_file)]
    args += ["--max-completion-length", "4", "--num-generations", "2", "--per-device-batch", "8"]
    args += ["--max-steps", "5", "--lr", "1e-2", "--lora-r", "8", "--lora-alpha", "16"]
    args += ["--seed", "0", "--out", str(out)]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output

    before = first_token_kl(str(sharp), [], items_file)
    after = first_token_kl(str(sharp), [out], items_file)
    print(f"\nfirst-token KL(unhinted || hinted) before {before:.6f} after {after:.6f}")
    assert after < 0.5 * before

    log = read_jsonl(out / "rl_log.jsonl.gz", RL_LOG.check)
    kls = [r["sdpo_kl"] for r in log]
    assert len(kls) == 5 and all(k is not None and k >= 0 for k in kls)
    assert kls[-1] < kls[0]  # the trainer's own term falls too
    assert all(r["entropy"] is None for r in log)  # no GRPO term in pure SDPO
    manifest = read_json(out / "manifest.json")
    assert (manifest["protocol"]["grpo_weight"], manifest["protocol"]["sdpo_weight"]) == (0.0, 1.0)
    assert read_json(out / "config.json")["command"] == "train-sdpo"
