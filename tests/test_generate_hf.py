"""The hf generation backend: batching, left padding, sort order, seeding, finish reasons.

python -m pytest tests/test_generate_hf.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from persona_cli import models
from persona_cli.generate import Completion, GenerationConfig, generate_hf
from persona_cli.generate.hf import RowSampler

QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Explain, in a few careful sentences, why the sky looks blue on a clear day at noon.",
    "Name a colour.",
    "What should I cook tonight if I only have eggs, rice and some spinach?",
]


def _load(spec: str):
    resolved = models.resolve(spec)
    return models.load_model(resolved), models.load_tokenizer(resolved)


def _prompts(tok) -> list[str]:
    return [
        tok.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def tiny(prepared_home: Path):
    return _load(models.TINY)


@pytest.fixture(scope="module")
def smol(prepared_home: Path):
    return _load(models.EMBEDDED)


@pytest.mark.embedded
def test_batched_greedy_equals_plain_one_prompt_generate(smol) -> None:
    """Reference: transformers' own greedy generate on each prompt alone, no padding, no
    processor of ours. Batched, left-padded, length-sorted generation must give the same."""
    model, tok = smol
    prompts = _prompts(tok)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, batch_size=3)
    ours = generate_hf(model, tok, prompts, cfg)
    assert [c.prompt_index for c in ours] == list(range(len(prompts)))
    for c, prompt in zip(ours, prompts, strict=True):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
            )
        new = ref[0, ids.shape[1] :].tolist()
        eos = tok.eos_token_id
        cut = new.index(eos) if eos in new else len(new)
        assert c.text == tok.decode(new[:cut], skip_special_tokens=True)
        assert c.finish_reason == ("stop" if eos in new else "length")
        assert c.n_tokens == (cut + 1 if eos in new else len(new))


@pytest.mark.embedded
def test_finish_reasons_and_token_counts(smol) -> None:
    model, tok = smol
    prompt = _prompts(tok)[:1]  # "What is the capital of France?": a short answer, then EOS
    stop = generate_hf(model, tok, prompt, GenerationConfig(max_new_tokens=40, temperature=0))
    assert stop[0].finish_reason == "stop" and "Paris" in stop[0].text
    answer_ids = tok(stop[0].text, add_special_tokens=False)["input_ids"]
    assert stop[0].n_tokens == len(answer_ids) + 1  # the end-of-turn token counts
    cut = generate_hf(model, tok, prompt, GenerationConfig(max_new_tokens=3, temperature=0))
    assert cut[0].finish_reason == "length" and cut[0].n_tokens == 3


def test_samples_do_not_depend_on_batch_size_or_order(tiny) -> None:
    model, tok = tiny
    prompts = _prompts(tok)
    cfg = GenerationConfig(max_new_tokens=10, n=3, batch_size=4, seed=5)
    a = generate_hf(model, tok, prompts, cfg)
    assert len(a) == len(prompts) * 3
    assert [(c.prompt_index, c.sample_index) for c in a] == [
        (i, s) for i in range(len(prompts)) for s in range(3)
    ]
    # Reversed prompt order, one row per batch: the same (prompt, sample) gives the same text.
    b = generate_hf(
        model, tok, prompts[::-1], GenerationConfig(**{**cfg.to_dict(), "batch_size": 1})
    )
    reindexed = {(len(prompts) - 1 - c.prompt_index, c.sample_index): c.text for c in b}
    assert {(c.prompt_index, c.sample_index): c.text for c in a} == reindexed
    # A prompt alone gives the same samples as in company.
    alone = generate_hf(model, tok, prompts[2:3], cfg)
    assert [c.text for c in alone] == [c.text for c in a if c.prompt_index == 2]
    # The n samples of one prompt are different draws; another seed gives other draws.
    assert len({c.text for c in a if c.prompt_index == 0}) == 3
    other = generate_hf(model, tok, prompts, GenerationConfig(**{**cfg.to_dict(), "seed": 6}))
    assert [c.text for c in other] != [c.text for c in a]
    assert all(isinstance(c, Completion) and c.finish_reason in ("stop", "length") for c in a)


def test_progress_reports_every_completion(tiny) -> None:
    model, tok = tiny
    seen: list[int] = []
    generate_hf(
        model,
        tok,
        _prompts(tok),
        GenerationConfig(max_new_tokens=2, n=2, batch_size=4),
        seen.append,
    )
    assert sum(seen) == len(QUESTIONS) * 2 and all(n <= 4 for n in seen)


def _sample_counts(logits: torch.Tensor, temperature: float, top_p: float, draws: int):
    gens = []
    for i in range(draws):
        g = torch.Generator()
        g.manual_seed(1000 + i)
        gens.append(g)
    scores = logits.expand(draws, -1).clone()
    out = RowSampler(gens, temperature, top_p)(None, scores)
    picks = out.argmax(-1)
    assert torch.all(out.isinf().sum(-1) == logits.shape[-1] - 1)  # exactly one token allowed
    return np.bincount(picks.numpy(), minlength=logits.shape[-1])


def test_row_sampler_matches_softmax_with_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    counts = _sample_counts(logits, 0.7, 1.0, 4000)
    expected = torch.softmax(logits[0] / 0.7, -1).numpy() * 4000
    assert sps.chisquare(counts, expected).pvalue > 0.001


def test_row_sampler_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0], -1).tolist()
    # Reference by a loop: the smallest set of most likely tokens whose mass reaches top_p.
    top_p, keep, mass = 0.8, [], 0.0
    for i in sorted(range(5), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        keep.append(i)
        mass += probs[i]
    counts = _sample_counts(logits, 1.0, top_p, 4000)
    assert set(np.nonzero(counts)[0]) == set(keep)
    expected = np.array([probs[i] / mass for i in keep]) * 4000
    assert sps.chisquare(counts[keep], expected).pvalue > 0.001


def test_config_rejects_bad_values() -> None:
    for bad in ({"n": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)
    assert set(GenerationConfig.help()) == set(GenerationConfig().to_dict())
