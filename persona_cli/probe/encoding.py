"""Token layout of a (prompt, completion) sample: what is scored, and how a batch is padded.

The prompt is the rendered prompt string of a pool row (chat template already applied), so it
is tokenised without special tokens; the completion is tokenised on its own and appended, which
is the token sequence generation produced (prompt tokens, then sampled tokens) rather than a
re-tokenisation across the boundary. Only completion tokens are scored: the loss of a sample is
the mean NLL over its completion tokens. A sample longer than `max_length` keeps its whole
prompt and loses the end of its completion (`truncated`).

Batches are right-padded. With a causal mask and right padding every real token sees exactly
the tokens it would see unpadded, at the same positions, so a padded row's logits and gradients
are those of the sample alone; pad positions are never scored, so their output gradient is 0.

    enc = encode(tokenizer, row["prompt"], row["completion"], max_length=1024)
    batch = collate([enc, ...], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    n_prompt: int
    n_completion: int  # completion tokens kept and scored
    truncated: bool


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    target_mask: torch.Tensor  # (B, T-1) 1 where logits[:, j] predicts a completion token j+1
    n_targets: torch.Tensor  # (B,) completion tokens per sample


def encode(tokenizer: Any, prompt: str, completion: str, *, max_length: int) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    room = max(0, max_length - len(prompt_ids))
    kept = completion_ids[:room]
    return Encoded(
        input_ids=tuple(prompt_ids + kept),
        n_prompt=len(prompt_ids),
        n_completion=len(kept),
        truncated=len(kept) < len(completion_ids),
    )


def collate(samples: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    if any(s.n_completion == 0 or s.n_prompt == 0 for s in samples):
        # Token 0 is never predicted: a sample needs a prompt token before its scored ones.
        raise ValueError("every sample in a batch needs >= 1 prompt and >= 1 completion token")
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    target = torch.zeros((len(samples), width - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attn[i, :n] = 1
        # logits at position j predict token j+1: completion tokens sit at n_prompt .. n-1.
        target[i, s.n_prompt - 1 : n - 1] = 1.0
    n_targets = torch.tensor([s.n_completion for s in samples], dtype=torch.float32)
    return Batch(ids.to(device), attn.to(device), target.to(device), n_targets.to(device))
