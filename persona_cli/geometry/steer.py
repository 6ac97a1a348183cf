"""Steering and ablation: forward hooks that move the residual stream along a vector.

Layers are numbered as `persona_cli.geometry.hidden` numbers hidden states: layer L (1..n) is
the output of decoder block L (`hidden_states[L]`); the hook is a forward hook on that block, so
everything after it (later blocks, the logits, generation) sees the edited stream. For the last
block, transformers applies the final norm after the hook, so `hidden_states[n]` is the normed
edited stream. Layer 0 (the embeddings) is not a block and cannot be steered.

- `steer(model, layer, vector, coef)`: adds coef * vector at every position.
- `ablate(model, layer, vector)`: removes the component along the vector,
  h - (h . u) u with u = vector / |vector|.
Both are context managers that remove their hook on exit, also on error.

Not wired into eval-markers or `persona_cli.generate` yet (a later change: `--steer
VECTORS:LAYER:COEF`, `--ablate VECTORS:LAYER`, recorded in the manifest and guarded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from persona_cli.errors import UserError


def decoder_blocks(model: Any) -> Any:
    """The model's ModuleList of decoder blocks (also under a peft wrapper)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise UserError(f"model {type(model).__name__}: no decoder blocks (`layers`) to hook")


def _block(model: Any, layer: int) -> Any:
    blocks = decoder_blocks(model)
    if not 1 <= layer <= len(blocks):
        raise UserError(
            f"steering layer {layer}: out of range; this model has blocks 1..{len(blocks)} "
            "(layer 0, the embeddings, cannot be steered)"
        )
    return blocks[layer - 1]


def _as_tensor(model: Any, vector: np.ndarray) -> Any:
    import torch

    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (model.config.hidden_size,):
        raise UserError(
            f"steering vector of shape {v.shape}: this model's hidden size is "
            f"{model.config.hidden_size}"
        )
    param = next(model.parameters())
    return torch.from_numpy(v).to(device=param.device, dtype=param.dtype)


@contextmanager
def _hooked(model: Any, layer: int, edit: Callable[[Any], Any]) -> Iterator[None]:
    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    # prepend: run before transformers' own output-capturing hook on the block, so the
    # `hidden_states[layer]` it records is the edited stream the next block receives
    handle = _block(model, layer).register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def steer(model: Any, layer: int, vector: np.ndarray, coef: float) -> Iterator[None]:
    """Add coef * vector to the output of decoder block `layer` while the context is open."""
    v = _as_tensor(model, vector) * coef
    with _hooked(model, layer, lambda h: h + v):
        yield


@contextmanager
def ablate(model: Any, layer: int, vector: np.ndarray) -> Iterator[None]:
    """Project the vector's direction out of the output of decoder block `layer`."""
    v = _as_tensor(model, vector)
    norm = float(v.double().norm())
    if norm == 0:
        raise UserError("ablation vector is zero: it has no direction to remove")
    u = v / norm
    with _hooked(model, layer, lambda h: h - (h @ u).unsqueeze(-1) * u):
        yield
