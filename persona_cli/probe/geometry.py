"""Cosines of per-sample gradients with v_hack, and the projection that removes v_hack.

Notation: g is one sample's gradient and v = v_hack, both split into the adapter's modules m
(one wrapped Linear each: LoRA A and B together, or the SVD delta); g_m, v_m are the parts.

- plain cosine over the concatenated adapter gradient, in [-1, 1]:
      cos = g . v / (|g| |v|)
- per-module norm-weighted cosine: the mean of the per-module cosines cos_m, each weighted by
  w_m = |g_m| |v_m| (a module counts as much as it contributes to g . v):
      cos_weighted = sum_m w_m cos_m / sum_m w_m = sum_m g_m . v_m / sum_m |g_m| |v_m|
  Its numerator is g . v and, by Cauchy-Schwarz, its denominator is <= |g| |v|, so it has the
  sign of `cos`, lies in [-1, 1], and |cos_weighted| >= |cos|: it reads how aligned g is with
  v module by module, ignoring how the modules' norms are distributed.
- projection, per module:  g_m' = g_m - (g_m . v_m / |v_m|^2) v_m, so cos(g_m', v_m) = 0.
  `when="positive"` (the default) fires only where cos_m > 0: there a descent step along g
  lowers NLL(hack) - NLL(clean), i.e. pushes toward hacking; a module already pointing away
  from v is left alone. `when="always"` fires on every module with a defined cosine.
A cosine is undefined (NaN here, null in rows) when |g_m| or |v_m| is 0; it never fires.

    cos, cos_w = cosines(grads, v, adapter)
    out = project(grads, v, adapter, when="positive")

`project` is the one projection: `probe replay --projected` applies it to each sample's update
and `train-grpo --vhack` (persona_cli.train.projection) to each optimizer step's gradient, as
a (1, P) row. `restrict_to_modules` zeroes v outside chosen modules, where the projection then
never fires (its cosine is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from persona_cli.probe.adapters import ProbeAdapter

_EPS = 0.0  # a norm of exactly 0 makes the cosine undefined; anything else is a direction


def _segments(adapter: ProbeAdapter) -> torch.Tensor:
    seg = torch.empty(adapter.size, dtype=torch.long)
    for i, m in enumerate(adapter.modules):
        sl = adapter.module_slices[m]
        seg[sl] = i
    return seg


def module_sums(x: torch.Tensor, adapter: ProbeAdapter) -> torch.Tensor:
    """(N, P) -> (N, M): sums of x over each module's columns."""
    out = torch.zeros((x.shape[0], len(adapter.modules)), dtype=torch.float64)
    return out.index_add_(1, _segments(adapter), x.double())


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > _EPS, a / torch.where(b > _EPS, b, torch.ones_like(b)), torch.nan)


@dataclass
class ModuleCosines:
    dots: torch.Tensor  # (N, M) g_m . v_m
    g_norm: torch.Tensor  # (N, M) |g_m|
    v_norm: torch.Tensor  # (M,) |v_m|

    @property
    def cos(self) -> torch.Tensor:
        """(N, M) per-module cosine, NaN where undefined."""
        return _safe_div(self.dots, self.g_norm * self.v_norm[None])


def module_cosines(grads: torch.Tensor, v: torch.Tensor, adapter: ProbeAdapter) -> ModuleCosines:
    dots = module_sums(grads * v[None], adapter)
    g_norm = module_sums(grads * grads, adapter).sqrt()
    v_norm = module_sums((v * v)[None], adapter)[0].sqrt()
    return ModuleCosines(dots, g_norm, v_norm)


def cosines(
    grads: torch.Tensor, v: torch.Tensor, adapter: ProbeAdapter
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, cos_weighted), each (N,) float64, NaN where undefined (see module docstring)."""
    mc = module_cosines(grads, v, adapter)
    dot = mc.dots.sum(1)
    g_total = (mc.g_norm**2).sum(1).sqrt()
    v_total = (mc.v_norm**2).sum().sqrt()
    cos = _safe_div(dot, g_total * v_total)
    cos_w = _safe_div(dot, (mc.g_norm * mc.v_norm[None]).sum(1))
    return cos, cos_w


@dataclass
class Projection:
    grads: torch.Tensor  # (N, P) projected gradients
    cos_in: torch.Tensor  # (N, M) NaN where undefined
    cos_out: torch.Tensor  # (N, M)
    fired: torch.Tensor  # (N, M) bool


def project(
    grads: torch.Tensor, v: torch.Tensor, adapter: ProbeAdapter, *, when: str | None
) -> Projection:
    """Remove v_m from g_m where the rule `when` fires ("positive", "always", or None: never)."""
    mc = module_cosines(grads, v, adapter)
    cos_in = mc.cos
    defined = ~torch.isnan(cos_in)
    if when == "positive":
        fired = defined & (cos_in > 0)
    elif when == "always":
        fired = defined
    elif when is None:
        fired = torch.zeros_like(defined)
    else:
        raise ValueError(f"unknown projection rule {when!r}")
    coef = torch.where(fired, _safe_div(mc.dots, mc.v_norm[None] ** 2), 0.0)  # (N, M)
    coef = torch.nan_to_num(coef, nan=0.0)
    out = grads - (coef[:, _segments(adapter)] * v[None].double()).to(grads.dtype)
    after = module_cosines(out, v, adapter).cos
    return Projection(out, cos_in, after, fired)


def matching_modules(adapter: ProbeAdapter, patterns: Sequence[str]) -> list[str]:
    """The adapter's modules whose name matches any glob in `patterns` (all when empty)."""
    if not patterns:
        return list(adapter.modules)
    return [m for m in adapter.modules if any(fnmatchcase(m, p) for p in patterns)]


def restrict_to_modules(
    v: torch.Tensor, adapter: ProbeAdapter, modules: Sequence[str]
) -> torch.Tensor:
    """v with every module outside `modules` zeroed (a copy)."""
    keep = set(modules)
    out = v.clone()
    for m in adapter.modules:
        if m not in keep:
            out[adapter.module_slices[m]] = 0.0
    return out
