"""The third channel of train-grpo: DPO on replay-trace pairs as a term of the GRPO objective.

The post-SFT framework combines three channels in one run:

    loss = grpo_weight * L_GRPO + sdpo_weight * KL_SDPO + dpo_weight * L_DPO

`--dpo-pairs FILE` is a pairs file (`replay-trace run`'s pairs.jsonl.gz, schema `pairs`: the
input of train-dpo) and `--dpo-weight` its weight. Every micro-batch takes the next
`--dpo-batch` pairs of a seeded permutation (cycling), and the term is the sigmoid DPO loss

    L_DPO = mean_pairs -log sigmoid(dpo_beta * (log pi(c)/ref(c) - log pi(r)/ref(r)))

with log pi(y) the summed log-probability of the answer tokens after the prompt (temperature
1: the model's distribution) and `ref` the starting policy (the base with any stack merged and
the fresh adapter at its zero-effect init), whose log-probabilities are computed once, before the
first update. Prompts go through the chat-template guard (`--system-prompt`) as in train-dpo.
Each step's pair indices are recorded in rl_log (`dpo_pairs`), so the term can be recomputed.

    channel = DpoChannel(encode_pairs(load_pairs(path), tokenizer, system, 2048, path), ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.errors import InputError
from persona_cli.train.dpo import Pair


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_pairs(
    pairs: list[Pair], tokenizer: Any, system: SystemPrompt, max_length: int, source: str | Path
) -> list[EncodedPair]:
    """Token ids of each pair's guarded prompt and its two answers (cut to max_length)."""
    report = inspect_template(tokenizer)
    out = []
    for i, pair in enumerate(pairs, start=1):
        prompt = render(tokenizer, pair.prompt, system, report, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answers = []
        for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            whole = render(
                tokenizer, pair.prompt + answer, system, report, add_generation_prompt=False
            )
            if not whole.startswith(prompt):
                raise InputError(source, f"pair {i}: the {side} answer re-renders the prompt", i)
            ids = tokenizer(whole[len(prompt) :], add_special_tokens=False)["input_ids"]
            answers.append(ids[: max(0, max_length - len(prompt_ids))])
        if not answers[0] or not answers[1]:
            raise InputError(
                source, f"pair {i}: the prompt alone fills --max-length {max_length}", i
            )
        out.append(EncodedPair(prompt_ids, answers[0], answers[1]))
    return out


def answer_logps(
    model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int
) -> torch.Tensor:
    """(B,) summed log p(answer | prompt) for (prompt ids, answer ids) pairs, one right-padded
    forward pass (with gradient when the caller has it on)."""
    device = next(model.parameters()).device
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros((len(sequences), width - 1), dtype=torch.bool)
    for i, (p, a) in enumerate(sequences):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        target[i, len(p) - 1 : len(p) + len(a) - 1] = True  # positions predicting answer tokens
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * target).sum(-1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """policy, reference: (2, B) answer log-probs, row 0 chosen and row 1 rejected. Returns the
    mean sigmoid DPO loss and the per-pair margins beta * (chosen - rejected log-ratio)."""
    margins = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    return -F.logsigmoid(margins).mean(), margins.detach()


class DpoChannel:
    """The DPO term: pair order, reference log-probs, and the loss of one micro-batch."""

    def __init__(
        self, pairs: list[EncodedPair], *, beta: float, batch: int, seed: int, pad_id: int
    ):
        self.pairs, self.beta, self.batch, self.pad_id = pairs, beta, batch, pad_id
        gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(pairs), generator=gen).tolist()
        self.reference: torch.Tensor | None = None  # (2, N)

    def _sequences(self, idx: list[int]) -> list[tuple[list[int], list[int]]]:
        chosen = [(self.pairs[i].prompt, self.pairs[i].chosen) for i in idx]
        rejected = [(self.pairs[i].prompt, self.pairs[i].rejected) for i in idx]
        return chosen + rejected

    def prepare_reference(self, model: Any) -> None:
        """Reference log-probs of every pair under `model` as it is now (the start policy)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                values = []
                for start in range(0, len(self.pairs), self.batch):
                    idx = list(range(start, min(start + self.batch, len(self.pairs))))
                    lp = answer_logps(model, self._sequences(idx), self.pad_id)
                    values.append(lp.view(2, len(idx)).cpu())
        finally:
            model.train(was_training)
        self.reference = torch.cat(values, dim=1)

    def indices(self, micro_batch: int) -> list[int]:
        """Pair indices of the `micro_batch`-th micro-batch of the run (0-based)."""
        n = len(self.order)
        return [self.order[(micro_batch * self.batch + k) % n] for k in range(self.batch)]

    def term(self, model: Any, micro_batch: int) -> tuple[torch.Tensor, list[int]]:
        """The DPO loss of one micro-batch (with gradient) and the pairs it used."""
        assert self.reference is not None, "prepare_reference first"
        idx = self.indices(micro_batch)
        policy = answer_logps(model, self._sequences(idx), self.pad_id).view(2, len(idx))
        reference = self.reference[:, idx].to(policy.device)
        loss, _ = dpo_loss(policy, reference, self.beta)
        return loss, idx
