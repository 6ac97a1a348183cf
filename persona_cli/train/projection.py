"""`train-grpo --vhack RUN`: the v_hack component removed from every optimizer update, per module.

The GRPO adapter is built by `persona_cli.probe.adapters.build_adapter` (LoRA or the SVD delta),
so its tensors have the layout v_hack was extracted in. At every optimizer step, after gradient
clipping and before the optimizer (a `TrainerCallback.on_pre_optimizer_step`), the adapter's
accumulated gradient g, one flat vector in that layout, goes through
`persona_cli.probe.geometry.project` as one (1, P) row: the function `probe replay --projected`
applies to each sample's update, so there is one projection. Per module m:

    cos_in_m  = cos(g_m, v_m)                    before
    g_m'      = g_m - (g_m . v_m / |v_m|^2) v_m   where the rule fires
    cos_out_m = cos(g_m', v_m)                   after (0 up to float rounding where it fired)

Rules (`--project`): `positive` fires where cos_in_m > 0 (the update would push toward hacking),
`always` on every module with a defined cosine, `off` never: the cosines are still measured and
logged, so a vanilla arm run with `--vhack X --project off` monitors the same direction without
changing its updates. `--project-modules GLOB,...` restricts the projection (and the cosines) to
matching modules: v_hack is zeroed elsewhere, where the cosine is undefined and nothing fires.

Per step the train log gets `proj_cos_in` / `proj_cos_out` (means over modules with a defined
cosine), `proj_frac_fired` (fired / defined), `proj_max_cos_out_fired` (the largest cos_out over
fired modules: <= 0 up to rounding) and, in rl_log, every module's (cos_in, cos_out, fired).

    projector = load_projector(job_vhack, resolved_model, adapter, rule="positive", patterns=())
    record = projector.apply()   # projects the adapter's .grad in place, returns the step record
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from persona_cli.errors import UserError
from persona_cli.models import ResolvedModel
from persona_cli.probe.adapters import ProbeAdapter
from persona_cli.probe.geometry import matching_modules, project, restrict_to_modules
from persona_cli.probe.vhack import check_layout, check_model, load_vhack
from persona_cli.train.rl_config import PROJECT_RULES

_ADAPTER_KEYS = ("kind", "rank", "alpha", "targets", "seed", "layers")


def check_adapter(meta: dict[str, Any], ours: dict[str, Any], source: str | Path) -> None:
    """v_hack must come from the same adapter kind, rank, alpha, targets, init seed (and layers,
    where `ours` names them): `ours` is `ProbeAdapter.record()` or the same keys planned."""
    theirs = meta["adapter"]
    for key in _ADAPTER_KEYS:
        if key not in ours:
            continue
        a, b = theirs.get(key), ours[key]
        if key == "alpha" and a is not None and b is not None:
            same = math.isclose(float(a), float(b))
        else:
            same = (list(a) if isinstance(a, list | tuple) else a) == (
                list(b) if isinstance(b, list | tuple) else b
            )
        if not same:
            flag = {
                "kind": "--adapter-kind",
                "rank": "--lora-r",
                "alpha": "--lora-alpha",
                "targets": "--lora-targets",
                "layers": "(all layers)",
                "seed": "--adapter-init-seed",
            }[key]
            raise UserError(
                f"--vhack {source}: extracted on a {theirs.get('kind')} adapter with {key} "
                f"{a!r}, this run's adapter has {key} {b!r} ({flag}); extract v_hack with the "
                "same adapter, or match it"
            )


def adapter_gradient(adapter: ProbeAdapter) -> torch.Tensor:
    """The adapter's accumulated .grad as one flat float32 vector (zeros where None)."""
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu()
        for p in adapter.parameters()
    ]
    return torch.cat(parts)


def set_adapter_gradient(adapter: ProbeAdapter, flat: torch.Tensor) -> None:
    for p, g in zip(adapter.parameters(), adapter.split(flat).values(), strict=True):
        p.grad = g.to(dtype=p.dtype, device=p.device).clone()


@dataclass
class UpdateProjector:
    """Projects the adapter's gradient at each optimizer step (module doc)."""

    adapter: ProbeAdapter
    v: torch.Tensor  # (P,) v_hack restricted to the chosen modules
    rule: str  # off | positive | always
    modules: list[str]  # the modules the projection may act on

    def apply(self) -> dict[str, Any]:
        g = adapter_gradient(self.adapter)
        when = None if self.rule == "off" else self.rule
        proj = project(g[None], self.v, self.adapter, when=when)
        if self.rule != "off":
            set_adapter_gradient(self.adapter, proj.grads[0])
        return step_record(self.adapter.modules, proj.cos_in[0], proj.cos_out[0], proj.fired[0])


def step_record(
    modules: Sequence[str], cos_in: torch.Tensor, cos_out: torch.Tensor, fired: torch.Tensor
) -> dict[str, Any]:
    """Aggregates and per-module values of one step's projection (NaN cosines as None)."""
    per_module = {}
    ins, outs, fired_out = [], [], []
    for m, ci, co, f in zip(
        modules, cos_in.tolist(), cos_out.tolist(), fired.tolist(), strict=True
    ):
        if math.isnan(ci):
            continue
        per_module[m] = [ci, co, bool(f)]
        ins.append(ci)
        outs.append(co)
        if f:
            fired_out.append(co)
    return {
        "proj_cos_in": sum(ins) / len(ins) if ins else None,
        "proj_cos_out": sum(outs) / len(outs) if outs else None,
        "proj_frac_fired": len(fired_out) / len(ins) if ins else None,
        "proj_max_cos_out_fired": max(fired_out) if fired_out else None,
        "projection": per_module,
    }


def load_projector(
    vhack: str | Path,
    model: ResolvedModel,
    adapter: ProbeAdapter,
    *,
    rule: str,
    patterns: Sequence[str],
) -> UpdateProjector:
    """Load v_hack and check it against the model and the adapter (one line each when not)."""
    if rule not in PROJECT_RULES:
        raise UserError(f"--project {rule!r}: choose one of {', '.join(PROJECT_RULES)}")
    tensors, meta = load_vhack(vhack)
    check_model(meta, model, vhack)
    check_adapter(meta, adapter.record(), vhack)
    check_layout(tensors, adapter, vhack)
    modules = matching_modules(adapter, patterns)
    if not modules:
        raise UserError(
            f"--project-modules {','.join(patterns)}: matches none of the adapter's "
            f"{len(adapter.modules)} modules (e.g. {adapter.modules[0]})"
        )
    v = adapter.join(tensors).float()
    return UpdateProjector(adapter, restrict_to_modules(v, adapter, modules), rule, modules)


class ProjectionCallback(TrainerCallback):
    """Runs the projector before each optimizer step; keeps the step's record for the log."""

    def __init__(self, projector: UpdateProjector):
        self.projector = projector
        self.last: dict[str, Any] | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = self.projector.apply()
