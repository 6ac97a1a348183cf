"""Hidden states at chosen layers for many sequences: batched, left-padded, length-sorted.

The contract: `hidden_states(model, sequences, layers)` returns, for each token-id sequence,
the hidden states at `layers` (0 = the embeddings, `hidden_states[0]`; L = the last block's
output, after the final norm as transformers returns it) at the positions asked for, exactly
as one unpadded forward pass of that sequence alone would give them (up to float rounding).
Sequences are sorted by length (longest first, like `persona_cli.generate.hf`), cut into
batches, left-padded with an attention mask, and given position ids that count real tokens
only, so padding shifts nothing.

The two centroid methods read different positions of the same forward pass:
- `prompt-last`: the prompt alone (rendered with the assistant header), the last position;
- `response-mean`: prompt + answer tokens, the mean over the answer's positions.

This module knows nothing about personas or files; it works on token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from persona_cli.errors import UserError

PROMPT_LAST = "prompt-last"
RESPONSE_MEAN = "response-mean"
METHODS = (PROMPT_LAST, RESPONSE_MEAN)
METHOD_CHOICES = (*METHODS, "both")


def methods_of(choice: str) -> tuple[str, ...]:
    """`--method` value -> the methods it records."""
    if choice not in METHOD_CHOICES:
        raise UserError(f"--method {choice!r}: choose from {', '.join(METHOD_CHOICES)}")
    return METHODS if choice == "both" else (choice,)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`0,3,all` -> sorted distinct hidden-state indices in 0..n_layers (0 = embeddings)."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if part == "all":
            out.update(range(n_layers + 1))
            continue
        try:
            layer = int(part)
        except ValueError:
            raise UserError(f"--layers {spec!r}: {part!r} is not a layer number or 'all'") from None
        if not 0 <= layer <= n_layers:
            raise UserError(
                f"--layers {spec!r}: layer {layer} is out of range; this model has hidden "
                f"states 0..{n_layers} (0 = embeddings)"
            )
        out.add(layer)
    if not out:
        raise UserError(f"--layers {spec!r}: no layers given")
    return sorted(out)


@dataclass(frozen=True)
class Span:
    """Token ids of one forward pass and how many of its final positions to average (1: the
    last token only, for prompt-last; the answer's length, for response-mean)."""

    ids: Sequence[int]
    last: int


def hidden_states(
    model: Any,
    spans: list[Span],
    layers: list[int],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """[len(spans), len(layers), hidden] float32: per span the mean hidden state over its last
    `span.last` positions at each layer (see module doc)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(spans)), key=lambda i: (-len(spans[i].ids), i))
    hidden = model.config.hidden_size
    out = np.zeros((len(spans), len(layers), hidden), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(spans[i].ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, i in enumerate(batch):
            seq = spans[i].ids
            ids[r, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[r, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            states = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                output_hidden_states=True,
                logits_to_keep=1,  # the vocabulary projection of every position is not needed
            ).hidden_states
        stacked = torch.stack([states[layer] for layer in layers], dim=1)  # [B, L, T, H]
        for r, i in enumerate(batch):
            tail = stacked[r, :, width - spans[i].last :, :].float().mean(dim=1)
            out[i] = tail.cpu().numpy()
        if progress is not None:
            progress(len(batch))
    return out


def n_hidden_layers(model: Any) -> int:
    """Transformer blocks; hidden states run 0..this (0 = embeddings)."""
    return int(model.config.num_hidden_layers)
