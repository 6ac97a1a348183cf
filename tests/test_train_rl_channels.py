"""train-grpo's mixed-policy generation and its three-channel objective, on tiny models.

Run: python -m pytest tests/test_train_rl_channels.py -q -s

- `--generator OTHER:0.5` with 4 generations: every group is 2 policy + 2 generator completions;
  the importance ratio pi/mu of the generator's tokens, recomputed by hand (one unpadded forward
  pass of each model per completion), equals the rows' log-probabilities and the logged mean,
  range, clip fraction and histogram;
- GRPO + SDPO + DPO: every step's logged loss is the weighted sum of the logged terms, and at
  each step each term recomputed separately from the policy the step started from (the step-1
  checkpoint for step 2): GRPO from the rows' advantages, SDPO's token KL and DPO's sigmoid
  loss from plain forward passes, equals its logged value.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from rl_helpers import SMALL, ok, perturbed_copy, write_pairs
from test_train_grpo import easy_items, letter_model, one_thread, tiny  # noqa: F401 (fixtures)

from persona_cli.artifacts import read_jsonl
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.models import load_model, load_tokenizer, resolve
from persona_cli.schemas import STEP
from persona_cli.train.channels import encode_pairs
from persona_cli.train.dpo import load_pairs
from persona_cli.train.mixed import LOG_RATIO_EDGES
from persona_cli.train.rewards import load_mc_tasks
from persona_cli.train.rl_log import RL_LOG

NONE = SystemPrompt.parse("none")


def _completion_logps(model: Any, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """log p of each completion token, one unpadded forward pass (temperature 1)."""
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_mixed_policy_shares_and_importance_ratio(tiny: Path, tmp_path: Path) -> None:  # noqa: F811
    other = perturbed_copy(tiny, tmp_path / "other", seed=7, scale=0.02)
    out = tmp_path / "mixed"
    ok("train-grpo", *SMALL, "--reward", "mc", "--max-steps", 1,
       "--generator", f"{other}:0.5", "--out", out)  # fmt: skip
    rows = read_jsonl(out / "step_000001.jsonl.gz", STEP.check)
    assert len(rows) == 8
    for g in range(2):  # slots: policy first, then the generator, in every group
        assert [r["generator"] for r in rows if r["group"] == g] == ["policy"] * 2 + [
            str(other)
        ] * 2

    tok = load_tokenizer(resolve("tiny-random"))
    policy = load_model(resolve("tiny-random"), dtype="float32").eval()  # step 1: LoRA B = 0
    behaviour = load_model(resolve(str(other)), dtype="float32").eval()
    log_r = []
    for r in rows:
        prompt_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        lp_pi = _completion_logps(policy, prompt_ids, r["completion_ids"])
        np.testing.assert_allclose(r["policy_logprobs"], lp_pi.numpy(), atol=1e-4)
        if r["generator"] == "policy":
            assert "behaviour_logprobs" not in r
            continue
        lp_mu = _completion_logps(behaviour, prompt_ids, r["completion_ids"])
        np.testing.assert_allclose(r["behaviour_logprobs"], lp_mu.numpy(), atol=1e-4)
        log_r.extend((lp_pi - lp_mu).double().tolist())
    log_r = np.array(log_r)
    ratio = np.exp(log_r)
    (logged,) = read_jsonl(out / "rl_log.jsonl.gz", RL_LOG.check)
    print(f"\nratio mean {ratio.mean():.4f} (logged {logged['ratio_mean']:.4f}), clip frac "
          f"{logged['ratio_clip_frac']:.3f}, hist {logged['ratio_hist']}")  # fmt: skip
    assert (
        logged["ratio_tokens"]
        == len(ratio)
        == sum(r["n_completion_tokens"] for r in rows if r["generator"] != "policy")
    )
    assert logged["ratio_mean"] == pytest.approx(ratio.mean(), rel=1e-4)
    assert logged["ratio_min"] == pytest.approx(ratio.min(), rel=1e-4)
    assert logged["ratio_max"] == pytest.approx(ratio.max(), rel=1e-4)
    assert logged["ratio_clip_frac"] == pytest.approx(np.mean(np.abs(ratio - 1) > 0.2))
    counts = [np.sum(log_r < LOG_RATIO_EDGES[0])]
    for lo, hi in itertools.pairwise(LOG_RATIO_EDGES):
        counts.append(np.sum((log_r >= lo) & (log_r < hi)))
    counts += [np.sum(log_r >= LOG_RATIO_EDGES[-1])]
    hist = np.array(counts) / len(log_r)
    np.testing.assert_allclose(logged["ratio_hist"], hist, atol=1e-12)
    assert logged["policy_completions"] == 4 and logged["completions"] == 8


def _sdpo_kl(model: Any, tok: Any, rows: list[dict], hinted: dict[str, str]) -> float:
    """Masked mean over all completion tokens of KL(student || teacher), full vocabulary."""
    total, n = 0.0, 0
    for r in rows:
        student = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        teacher = tok(hinted[r["task_id"]], add_special_tokens=False)["input_ids"]
        c = r["completion_ids"]
        with torch.no_grad():
            s = model(input_ids=torch.tensor([student + c])).logits[0, len(student) - 1 : -1]
            t = model(input_ids=torch.tensor([teacher + c])).logits[0, len(teacher) - 1 : -1]
        ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
        total += float((ls.exp() * (ls - lt)).sum())
        n += len(c)
    return total / n


def _dpo(policy: Any, ref: Any, pairs: list[Any], idx: list[int], beta: float) -> float:
    def logp(model: Any, prompt: list[int], answer: list[int]) -> float:
        return float(_completion_logps(model, prompt, answer).double().sum())

    losses = []
    for i in idx:
        p = pairs[i]
        margin = beta * (
            (logp(policy, p.prompt, p.chosen) - logp(ref, p.prompt, p.chosen))
            - (logp(policy, p.prompt, p.rejected) - logp(ref, p.prompt, p.rejected))
        )
        losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
    return sum(losses) / len(losses)


def test_three_channel_terms_equal_each_term_computed_separately(
    letter_model: Path,  # noqa: F811
    easy_items: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "three"
    args = ["train-grpo", "--model", letter_model, "--reward", "mc", "--data", easy_items]
    args += ["--num-generations", 4, "--per-device-batch", 16, "--max-completion-length", 2]
    args += ["--lora-r", 4, "--lora-alpha", 8, "--lr", "1e-2", "--seed", 0, "--max-steps", 2]
    args += ["--sdpo-weight", 0.5, "--dpo-pairs", pairs_file, "--dpo-weight", 0.7]
    args += ["--dpo-beta", 0.1, "--dpo-batch", 2, "--save-steps", 1, "--keep-checkpoints"]
    ok(*args, "--out", out)
    log = read_jsonl(out / "rl_log.jsonl.gz", RL_LOG.check)
    for r in log:  # the total is the weighted sum of the logged terms
        assert r["loss"] == pytest.approx(
            r["grpo_loss"] + 0.5 * r["sdpo_kl"] + 0.7 * r["dpo_loss"], abs=1e-5
        )
    assert log[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference

    # Each step's terms separately, from the policy the step started from: the letter model
    # itself at step 1, the step-1 checkpoint merged into it at step 2.
    tok = load_tokenizer(resolve(str(letter_model)))
    ref = load_model(resolve(str(letter_model)), dtype="float32").eval()
    base = load_model(resolve(str(letter_model)), dtype="float32")
    step1 = PeftModel.from_pretrained(base, str(out / "checkpoints" / "checkpoint-1"))
    before = {1: ref, 2: step1.merge_and_unload().eval()}
    tasks, _ = load_mc_tasks(easy_items)
    report = inspect_template(tok)
    hinted = {
        t.id: render(
            tok, [{"role": "user", "content": t.hinted_text()}], NONE, report,
            add_generation_prompt=True,
        )
        for t in tasks
    }  # fmt: skip
    encoded = encode_pairs(load_pairs(pairs_file), tok, NONE, 2048, pairs_file)
    signal = False
    for step, logged in zip((1, 2), log, strict=True):
        rows = read_jsonl(out / f"step_{step:06d}.jsonl.gz", STEP.check)
        signal |= any(r["advantage"] != 0 for r in rows)
        # GRPO (dapo, on-policy ratio 1, beta 0): -sum_i A_i n_i / sum_i n_i.
        grpo = -sum(r["advantage"] * r["n_completion_tokens"] for r in rows) / sum(
            r["n_completion_tokens"] for r in rows
        )
        sdpo = _sdpo_kl(before[step], tok, rows, hinted)
        dpo = _dpo(before[step], ref, encoded, logged["dpo_pairs"], 0.1)
        print(f"\nstep {step}: grpo {grpo:.6f}  sdpo {sdpo:.6f}  dpo {dpo:.6f}")
        assert logged["grpo_loss"] == pytest.approx(grpo, abs=1e-5)
        assert logged["sdpo_kl"] == pytest.approx(sdpo, abs=1e-5)
        assert logged["dpo_loss"] == pytest.approx(dpo, abs=1e-5)
        assert len(logged["dpo_pairs"]) == 2
    assert signal  # some group had unequal rewards: the GRPO term was not trivially 0
