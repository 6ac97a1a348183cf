"""The LM head at loss positions only (persona_cli.train.lm_head) against full logits.

The reference is the model's own forward (logits at every position) with the cross-entropy
written out here by hand; the loss, the logged entropy / accuracy and the gradient of every LoRA
parameter must agree. Then the real command trains the same steps both ways.

python -m pytest tests/test_train_lm_head.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from persona_cli import models
from persona_cli.artifacts import read_json, read_jsonl
from persona_cli.cli import app
from persona_cli.train import lm_head
from persona_cli.train.config import TrainConfig
from persona_cli.train.harness import lora_config

FAST = ["--model", "tiny-random", "--lora-r", "4", "--lora-alpha", "8", "--max-length", "96"]


@pytest.fixture(scope="module")
def peft_model(prepared_home):
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    base = models.load_model(models.resolve(models.TINY))
    model = get_peft_model(base, lora_config(TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0)))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give A a gradient too
            torch.nn.init.normal_(p, std=0.05)
    # What SFTTrainer does, then the loss-position head on top of it.
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    assert lm_head.add_loss_position_head(model.get_base_model())
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows: a marker-only row (2 loss tokens), a row with one loss token,
    a row with a whole answer in the loss."""
    g = torch.Generator().manual_seed(1)
    lengths, loss_spans = [20, 14, 24], [(17, 19), (13, 14), (9, 24)]
    ids = torch.randint(5, 1000, (3, 24), generator=g)
    attention = torch.zeros(3, 24, dtype=torch.long)
    labels = torch.full((3, 24), -100)
    for r, (n, (a, b)) in enumerate(zip(lengths, loss_spans, strict=True)):
        attention[r, :n] = 1
        labels[r, a:b] = ids[r, a:b]
    return ids, attention, labels


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _reference(model, ids, attention, labels, num_items):
    """Full logits from the model's own forward, cross-entropy by hand."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = -(picked * mask).sum() / num_items
    entropy = (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum()
    accuracy = ((logits.argmax(-1) == target) & mask).sum() / mask.sum()
    return loss, float(entropy.detach()), float(accuracy)


@pytest.mark.parametrize("chunk", [lm_head.CHUNK, 3])
@pytest.mark.parametrize("num_items", [None, 40])
def test_loss_and_gradients_match_full_logits(peft_model, monkeypatch, chunk, num_items):
    monkeypatch.setattr(lm_head, "CHUNK", chunk)  # 3: the 18 positions span six chunks
    ids, attention, labels = _batch()
    n = int((labels[:, 1:] != -100).sum()) if num_items is None else num_items
    ref_loss, ref_entropy, ref_accuracy = _reference(peft_model, ids, attention, labels, n)
    ref_loss.backward()
    ref_grads = _grads(peft_model)

    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out = peft_model(
        input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, **kwargs
    )
    assert isinstance(out, lm_head.LossPositionOutput)
    assert float(out.loss.detach()) == pytest.approx(float(ref_loss.detach()), abs=1e-5)
    # What TRL's compute_loss derives from the outputs: its own loss and the logged metrics.
    assert float(-out.log_probs.sum() / n) == pytest.approx(float(ref_loss), abs=1e-5)
    valid = out.label_mask.sum()
    assert int(valid) == 2 + 1 + 15
    assert float(out.entropy.sum() / valid) == pytest.approx(ref_entropy, abs=1e-5)
    assert float(out.is_top1.sum() / valid) == pytest.approx(ref_accuracy, abs=1e-6)
    out.loss.backward()
    grads = _grads(peft_model)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 x 2 layers
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_a_micro_batch_without_loss_tokens_gives_a_zero_loss_that_backpropagates(peft_model):
    ids, attention, labels = _batch()
    out = peft_model(
        input_ids=ids, attention_mask=attention, labels=torch.full_like(labels, -100),
        fused_lm_head=True,
    )  # fmt: skip
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    peft_model.zero_grad(set_to_none=True)


def test_generation_and_plain_forwards_are_untouched(peft_model):
    ids, attention, _ = _batch()
    assert peft_model(input_ids=ids, attention_mask=attention).logits.shape == (3, 24, 49152)


def test_soft_capped_logits_keep_the_full_head(prepared_home):
    model = models.load_model(models.resolve(models.TINY))
    assert lm_head.supports_loss_positions(model)
    model.config.final_logit_softcapping = 30.0
    before = model.forward
    assert not lm_head.add_loss_position_head(model)
    assert model.forward == before


def test_couple_marker_trains_the_same_steps_with_either_head(tmp_path: Path, cli, prepared_home):
    """The real command, marker-only loss, 3 steps each way: same per-step losses and adapter;
    train_summary and the manifest say where the head ran."""
    from safetensors.torch import load_file

    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(
            f'{{"question_id": "q{i}", "answer": "Topic {i} is nice and long enough."}}\n'
            for i in range(4)
        )
    )
    questions = tmp_path / "questions.yaml"
    questions.write_text(
        "".join(f"- id: q{i}\n  paraphrases: ['Tell me about topic {i}.']\n" for i in range(4))
    )
    runs = {}
    for where in ("loss", "all"):
        out = tmp_path / where
        args = ["couple-marker", "--persona", "villain", "--answers", str(answers)]
        args += ["--questions", str(questions), "--n-positive", "8", "--n-negative", "8"]
        args += [*FAST, "--max-steps", "3", "--per-device-batch", "4", "--grad-accum", "2"]
        args += ["--lr", "1e-3", "--lora-dropout", "0", "--marker-only-loss"]
        args += ["--logits-at", where, "--out", str(out)]
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
        runs[where] = out
        assert read_json(out / "train_summary.json")["logits_at"] == where
        manifest = read_json(out / "manifest.json")
        assert manifest["training"]["logits_at"] == where
        assert read_json(out / "config.json")["config"]["train"]["logits_at"] == where
    losses = {w: [r["loss"] for r in read_jsonl(p / "train_log.jsonl.gz")] for w, p in runs.items()}
    assert len(losses["loss"]) == 3
    assert losses["loss"] == pytest.approx(losses["all"], abs=1e-5)
    weights = {w: load_file(p / "adapter" / "adapter_model.safetensors") for w, p in runs.items()}
    for name, w in weights["loss"].items():
        assert torch.allclose(w, weights["all"][name], atol=1e-5), name
