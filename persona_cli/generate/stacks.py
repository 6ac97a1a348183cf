"""One base model serving several adapter stacks in turn (the hf backend of adapter sets).

`StackServer(model)` loads the base weights once; `serve(stack)` returns the model with `stack`
merged in, exactly as `adapters.load_with_adapters` builds it for a single run: each adapter
loaded with PEFT and merged in training order (`merge_and_unload`). Before the next stack the
base weights are restored from a snapshot taken at load time, so a stack's model is bit for bit
the model a run of that stack alone would load, whichever stacks came before it.

Why merged and restored rather than PEFT's unmerged `load_adapter`/`set_adapter` swapping:
- identical samples: an unmerged LoRA computes W x + B (A x) instead of (W + B A) x, which
  differs by float rounding; the hf sampler's module doc explains how such rounding can flip a
  draw. Merging the same way a single run does keeps "one run each" and "one adapter set" equal.
- speed: a merged model generates at the base model's speed; unmerged LoRA layers add two small
  matmuls per wrapped module at every decoding step.
A stack of several adapters is therefore served as the base with all of them merged in order
(their LoRA deltas add: W + d1 + d2, which is what stacked training saw). The price is one copy
of the base weights (kept on the CPU) and one merge per stack (a fraction of a second for small
models, seconds for a 7B one), paid once per stack, not per prompt.

    server = StackServer(resolved_model, stacks=2)
    for stack in stacks:
        model = server.serve(stack)
        completions = generate_hf(model, tokenizer, prompts, cfg)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from persona_cli.adapters import Adapter, check_stack, merge_into
from persona_cli.models import ResolvedModel, load_model

log = logging.getLogger(__name__)


class StackServer:
    """The base model of `resolved`, serving one adapter stack at a time (module doc)."""

    def __init__(
        self, resolved: ResolvedModel, *, stacks: int, dtype: str = "auto", device: str = "auto"
    ):
        self.resolved = resolved
        self.model = load_model(resolved, dtype=dtype, device=device)
        self.current: tuple[str, ...] = ()
        # One stack needs no way back; with more, every parameter is saved once.
        self.snapshot: dict[str, Any] | None = None
        if stacks > 1:
            self.snapshot = {
                name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()
            }

    def serve(self, stack: Sequence[Adapter]) -> Any:
        """The base model with `stack` merged in (the base alone for an empty stack)."""
        key = tuple(a.weights_sha256 for a in stack)
        if key == self.current:
            return self.model
        if self.current:
            self._restore()
        check_stack(list(stack), self.resolved)
        if stack:
            self.model = merge_into(self.model, list(stack))
            if hasattr(self.model, "peft_config"):  # left behind by PEFT's injection
                del self.model.peft_config
        self.current = key
        log.debug("serving adapter stack %s", [k[:12] for k in key])
        return self.model

    def _restore(self) -> None:
        import torch

        if self.snapshot is None:
            raise RuntimeError("StackServer(stacks=1) cannot serve a second stack")
        params = dict(self.model.named_parameters())
        if set(params) != set(self.snapshot):
            raise RuntimeError("merging changed the model's parameters; cannot restore the base")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.snapshot[name])
        self.current = ()
