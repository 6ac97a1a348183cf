"""Per-sample gradients of the mean completion NLL over the probe adapter's tensors only.

Two paths that must agree (tests/test_probe_grads.py checks them against each other to 1e-4):

- `batched` (the vectorised path): one right-padded forward and one backward of
  L = sum_i NLL_i, where NLL_i is sample i's mean NLL over its completion tokens. Samples do not
  interact in the forward pass, so dL/d(output of sample i) is exactly the gradient of NLL_i
  alone. Every trainable adapter tensor is the weight of a Linear (LoRA A and B) or of a
  `DiagScale` (the SVD delta), whose per-sample gradients are sums over that sample's tokens:

      Linear  y = x W^T:      dNLL_i/dW     = sum_t g_it x_it^T      (einsum "bto,bti->boi")
      DiagScale z = h*delta:  dNLL_i/ddelta = sum_t g_it * h_it      (sum over t of h*g)

  with x/h the module input captured by a forward hook and g the output gradient captured by a
  tensor hook. Pad positions are not scored, so their g is 0 and padding drops out per sample.
  The cost is one batched forward+backward plus one small einsum per adapter tensor; this is
  the same trick as torch.func `vmap(grad(...))` would vectorise, without running the model
  under vmap (HF attention-mask code is not vmap-safe).
- `loop`: one unpadded forward and one `autograd.grad` per sample (the research log's method):
  slow, and independent of the hooks and of padding, so it is the reference.

    losses, grads = per_sample_grads(adapter, samples, pad_id, method="batched", batch_size=8)
    # grads: (N, P) float32, columns in adapter.tensors order
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from persona_cli.probe.adapters import DiagScale, ProbeAdapter
from persona_cli.probe.encoding import Batch, Encoded, collate


@dataclass
class SampleGrads:
    nll: torch.Tensor  # (N,) mean completion NLL per sample
    grads: torch.Tensor  # (N, P) per-sample gradient of nll over the adapter tensors
    token_logprobs: list[torch.Tensor]  # per sample, log p of each scored completion token


def _device(adapter: ProbeAdapter) -> torch.device:
    return adapter.parameters()[0].device


def token_nll(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T-1) NLL of each next token (0 where not scored).

    The LM head runs only on the columns some sample scores (`logits_to_keep`): with a long
    prompt and a 49k vocabulary, logits over the prompt would be most of the compute.
    """
    cols = batch.target_mask.any(0).nonzero().flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    keep = torch.arange(lo, hi, device=batch.input_ids.device)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep
    ).logits.float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.input_ids[:, lo + 1 : hi + 1].reshape(-1),
        reduction="none",
    ).view(logits.shape[:2])
    out = torch.zeros_like(batch.target_mask)
    out[:, lo:hi] = nll * batch.target_mask[:, lo:hi]
    return out


def per_sample_nll(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean completion NLL per sample (B,), token NLLs (B, T-1))."""
    tok = token_nll(model, batch)
    return tok.sum(1) / batch.n_targets, tok


class _Capture:
    """Forward hooks that keep each capture module's input and its output's gradient."""

    def __init__(self, modules: list[nn.Module]):
        self.inputs: list[torch.Tensor | None] = [None] * len(modules)
        self.out_grads: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Any:
        def keep_grad(g: torch.Tensor) -> None:
            self.out_grads[i] = g.detach()

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if self.inputs[i] is not None:
                # A module called twice per forward would need its calls summed; the probe
                # adapters call each once, and gradient checkpointing (which re-runs) is off.
                raise RuntimeError("adapter module ran twice in one forward pass")
            self.inputs[i] = args[0].detach()
            out.register_hook(keep_grad)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _batched_chunk(
    adapter: ProbeAdapter, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    capture = _Capture(adapter.captures)
    try:
        nll, tok = per_sample_nll(adapter.model, batch)
        # autograd.grad, not backward: the hooks see the output gradients and .grad stays as is.
        torch.autograd.grad(nll.sum(), adapter.parameters())
    finally:
        capture.close()
    b = batch.input_ids.shape[0]
    out = torch.empty((b, adapter.size), dtype=torch.float32, device=nll.device)
    for t, module, x, g in zip(
        adapter.tensors, adapter.captures, capture.inputs, capture.out_grads, strict=True
    ):
        assert x is not None and g is not None
        x, g = x.float(), g.float()
        if isinstance(module, DiagScale):
            per = (x * g).sum(1)  # (B, r)
        else:
            per = torch.einsum("bto,bti->boi", g, x)  # (B, out, in), the weight's layout
        out[:, t.start : t.stop] = per.reshape(b, -1)
    return nll.detach(), out, tok.detach()


def _loop_one(
    adapter: ProbeAdapter, sample: Encoded
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = collate([sample], pad_id=0, device=_device(adapter))  # one row: no padding at all
    nll, tok = per_sample_nll(adapter.model, batch)
    grads = torch.autograd.grad(nll[0], adapter.parameters())
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    return nll.detach(), flat[None], tok.detach()


def per_sample_grads(
    adapter: ProbeAdapter,
    samples: list[Encoded],
    pad_id: int,
    *,
    method: str = "batched",
    batch_size: int = 8,
) -> SampleGrads:
    """Per-sample mean-NLL gradients for `samples` (each needs >= 1 completion token)."""
    if not samples:
        return SampleGrads(torch.zeros(0), torch.zeros((0, adapter.size)), [])
    device = _device(adapter)
    nlls, grads, logprobs = [], [], []
    if method == "batched":
        chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
        for chunk in chunks:
            nll, g, tok = _batched_chunk(adapter, collate(chunk, pad_id, device))
            nlls.append(nll)
            grads.append(g)
            logprobs.extend(_scored(tok, chunk))
    elif method == "loop":
        for sample in samples:
            nll, g, tok = _loop_one(adapter, sample)
            nlls.append(nll)
            grads.append(g)
            logprobs.extend(_scored(tok, [sample]))
    else:
        raise ValueError(f"unknown gradient method {method!r}")
    return SampleGrads(torch.cat(nlls).cpu(), torch.cat(grads).cpu(), logprobs)


def _scored(tok: torch.Tensor, chunk: list[Encoded]) -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(chunk):
        start = s.n_prompt - 1
        out.append(-tok[i, start : start + s.n_completion].cpu())
    return out


def batch_gradient(adapter: ProbeAdapter, samples: list[Encoded], pad_id: int) -> torch.Tensor:
    """Gradient of sum_i NLL_i from one plain forward+backward: the cost baseline of the
    benchmark, and a cross-check (it equals the sum of the per-sample gradients)."""
    batch = collate(samples, pad_id, _device(adapter))
    nll, _ = per_sample_nll(adapter.model, batch)
    grads = torch.autograd.grad(nll.sum(), adapter.parameters())
    return torch.cat([g.reshape(-1).float() for g in grads]).cpu()
