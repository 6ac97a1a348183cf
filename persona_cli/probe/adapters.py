"""Probe adapters over a frozen base model: the parameter space v_hack and the cosines live in.

Two kinds, chosen with `--adapter`:

- `lora`: PEFT LoRA on the chosen Linear modules, rank r, alpha, dropout 0 (a gradient probe
  must be deterministic). At initialisation B = 0, so the gradient w.r.t. A is exactly zero and
  only B carries signal until the adapter has moved; A's random init is seeded (`seed`) and
  v_hack is only meaningful for the same init, which is why the seed goes into its metadata.
- `svd`: an SVD-delta adapter. Each wrapped `nn.Linear` with weight W = U diag(S) V^T (thin
  SVD, computed once in fp32) becomes `SVDDeltaLinear`:

      W' = W + U_r diag(delta) V_r^T        y = x W'^T + b = base(x) + ((x V_r) * delta) U_r^T

  where U_r, V_r are the top-r singular vectors (frozen buffers) and `delta` (r values, init 0)
  is the only trainable tensor: a trainable change of the top-r singular values. The product
  `(x V_r) * delta` is computed by a `DiagScale` submodule so per-sample gradients can be read
  off with the same hooks as a Linear (persona_cli.probe.grads).

Either way only adapter tensors require grad; base weights are frozen. `ProbeAdapter.layout`
fixes one order of the adapter tensors (module by module), so a flat gradient vector, the
per-module slices and the tensors saved in `v_hack.safetensors` all agree.

    adapter = build_adapter(model, AdapterConfig(kind="svd", rank=4))
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persona_cli.errors import UserError
from persona_cli.probe.config import AdapterConfig

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class DiagScale(nn.Module):
    """z = h * delta over the last dimension; `delta` is the trainable vector (init 0)."""

    def __init__(self, rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rank, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight


class SVDDeltaLinear(nn.Module):
    """`base(x) + ((x V_r) * delta) U_r^T`: a trainable delta on the top-r singular values."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        weight = base.weight.detach()
        rank = min(rank, *weight.shape)
        # fp32 SVD: bf16 singular vectors would be too coarse to define a direction.
        u, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        self.register_buffer("u_r", u[:, :rank].to(weight.dtype).contiguous())
        self.register_buffer("v_r", vh[:rank].T.to(weight.dtype).contiguous())
        self.delta = DiagScale(rank, weight.dtype, weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x @ self.v_r) @ self.u_r.T


@dataclass(frozen=True)
class AdapterTensor:
    """One trainable adapter tensor and where it sits in the flat gradient vector."""

    key: str  # name in v_hack.safetensors: "<module>.<lora_A|lora_B|delta>"
    module: str  # the wrapped Linear, e.g. "model.layers.0.self_attn.q_proj"
    shape: tuple[int, ...]
    start: int
    stop: int


class ProbeAdapter:
    """The wrapped model plus the fixed layout of its trainable adapter tensors."""

    def __init__(
        self, model: nn.Module, config: AdapterConfig, entries: list[tuple[str, str, Any]]
    ):
        # entries: (module name, tensor name, capture submodule) in layout order; the capture
        # submodule is an nn.Linear or DiagScale whose `.weight` is the trainable tensor.
        self.model = model
        self.config = config
        self.captures: list[nn.Module] = []
        tensors: list[AdapterTensor] = []
        offset = 0
        for module, name, capture in entries:
            weight = capture.weight
            n = weight.numel()
            tensors.append(
                AdapterTensor(f"{module}.{name}", module, tuple(weight.shape), offset, offset + n)
            )
            self.captures.append(capture)
            offset += n
        self.tensors = tensors
        self.size = offset
        self.modules: list[str] = list(dict.fromkeys(t.module for t in tensors))
        self.module_slices: dict[str, slice] = {}
        for m in self.modules:
            own = [t for t in tensors if t.module == m]
            self.module_slices[m] = slice(own[0].start, own[-1].stop)

    def parameters(self) -> list[nn.Parameter]:
        return [c.weight for c in self.captures]

    def flat(self) -> torch.Tensor:
        """The adapter tensors concatenated in layout order (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def state(self) -> dict[str, torch.Tensor]:
        return {
            t.key: p.detach().clone() for t, p in zip(self.tensors, self.parameters(), strict=True)
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for t, p in zip(self.tensors, self.parameters(), strict=True):
                p.copy_(state[t.key])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector (P,) as one tensor per adapter tensor, shaped like it."""
        return {t.key: flat[t.start : t.stop].reshape(t.shape).contiguous() for t in self.tensors}

    def join(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[t.key].reshape(-1) for t in self.tensors])

    def layers(self) -> list[int]:
        return sorted({_layer_of(m) for m in self.modules if _layer_of(m) is not None})  # type: ignore[type-var]

    def record(self) -> dict[str, Any]:
        """What v_hack's metadata and the manifests say about the adapter."""
        return {
            "kind": self.config.kind,
            "rank": self.config.rank,
            "alpha": self.config.alpha if self.config.kind == "lora" else None,
            "targets": list(self.config.targets),
            "layers": self.layers(),
            "seed": self.config.seed,
            "modules": len(self.modules),
            "parameters": self.size,
        }


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search("." + name)
    return int(m.group(1)) if m else None


def target_linears(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the Linear modules the adapter wraps (by last name component and layer)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in config.targets:
            continue
        layer = _layer_of(name)
        if config.layers is not None and layer not in config.layers:
            continue
        found.append(name)
    if not found:
        layers = "all layers" if config.layers is None else f"layers {list(config.layers)}"
        raise UserError(
            f"--targets {','.join(config.targets)}: no nn.Linear of that name in {layers} of "
            "this model"
        )
    return found


def build_adapter(
    model: nn.Module, config: AdapterConfig, *, dropout: float = 0.0, task_type: str | None = None
) -> ProbeAdapter:
    """Freeze `model` and wrap its target Linears with the adapter `config.kind` describes.

    `dropout` and `task_type` are for training (train-grpo builds its adapter here so that a
    v_hack extracted on the same config lives in the same parameter space, LoRA A's seeded init
    included); the probe stages keep the defaults (no dropout: deterministic gradients)."""
    config.check()
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_linears(model, config)
    if config.kind == "lora":
        return _build_lora(model, config, names, dropout, task_type)
    return _build_svd(model, config, names)


def _build_lora(
    model: nn.Module,
    config: AdapterConfig,
    names: list[str],
    dropout: float = 0.0,
    task_type: str | None = None,
) -> ProbeAdapter:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # LoRA A's kaiming init draws from the global generator
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=dropout,
        target_modules=names,
        bias="none",
        task_type=task_type,
    )
    peft_model = get_peft_model(model, lora)
    inner = peft_model.base_model.model
    entries = []
    for name in names:
        layer = inner.get_submodule(name)
        entries.append((name, "lora_A", layer.lora_A["default"]))
        entries.append((name, "lora_B", layer.lora_B["default"]))
    adapter = ProbeAdapter(peft_model, config, entries)
    _check_only_adapter_trains(peft_model, adapter)
    return adapter


def _build_svd(model: nn.Module, config: AdapterConfig, names: list[str]) -> ProbeAdapter:
    entries = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = SVDDeltaLinear(getattr(parent, child), config.rank)
        setattr(parent, child, wrapped)
        entries.append((name, "delta", wrapped.delta))
    adapter = ProbeAdapter(model, config, entries)
    _check_only_adapter_trains(model, adapter)
    return adapter


def _check_only_adapter_trains(model: nn.Module, adapter: ProbeAdapter) -> None:
    # PEFT marks its own tensors trainable; anything else trainable would leak into the update.
    ours = {id(p) for p in adapter.parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
    if stray:
        raise RuntimeError(f"parameters outside the probe adapter require grad: {stray[:3]}")
    for p in adapter.parameters():
        p.requires_grad_(True)


def load_adapted(
    model: Any, config: AdapterConfig, *, dtype: str = "float32"
) -> tuple[Any, ProbeAdapter]:
    """(tokenizer, adapter) for a resolved model spec: frozen base weights, adapter on top."""
    from persona_cli.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    base = load_model(model, dtype=dtype)
    base.eval()  # no dropout anywhere: gradients must be a function of the weights and rows
    return tokenizer, build_adapter(base, config)


# ----------------------------------------------------------------------------- saved svd adapters

SVD_KIND_KEY = "persona_cli_adapter_kind"  # in adapter_config.json; PEFT never reads this file


def save_svd_adapter(directory: Path, adapter: ProbeAdapter) -> None:
    """An svd adapter as an adapter directory: `adapter_model.safetensors` holds, per wrapped
    Linear, `delta` and the frozen `u_r`, `v_r` (so a reload needs no SVD and is exact), and
    `adapter_config.json` says what it is. `merge_svd_adapter` folds it into a base model."""
    from safetensors.torch import save

    from persona_cli.artifacts import write_bytes_atomic, write_json

    tensors: dict[str, torch.Tensor] = {}
    for t, capture in zip(adapter.tensors, adapter.captures, strict=True):
        wrapper = _svd_wrapper(adapter.model, t.module)
        tensors[f"{t.module}.delta"] = capture.weight.detach().float().cpu().contiguous()
        tensors[f"{t.module}.u_r"] = wrapper.u_r.detach().float().cpu().contiguous()
        tensors[f"{t.module}.v_r"] = wrapper.v_r.detach().float().cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / "adapter_model.safetensors", save(tensors))
    write_json(
        directory / "adapter_config.json",
        {SVD_KIND_KEY: "svd", **adapter.record(), "module_names": adapter.modules},
    )


def _svd_wrapper(model: nn.Module, name: str) -> SVDDeltaLinear:
    module = model.get_submodule(name)
    if not isinstance(module, SVDDeltaLinear):
        raise RuntimeError(f"{name} is not wrapped by the svd adapter")
    return module


def is_svd_adapter_dir(directory: Path) -> bool:
    import json

    config = directory / "adapter_config.json"
    return config.is_file() and json.loads(config.read_text()).get(SVD_KIND_KEY) == "svd"


def load_svd_state(directory: Path, adapter: ProbeAdapter) -> None:
    """Load a saved svd adapter's deltas into a freshly built one (resume from a checkpoint)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    adapter.load_state({t.key: tensors[f"{t.module}.delta"] for t in adapter.tensors})


def merge_svd_adapter(model: nn.Module, directory: Path) -> nn.Module:
    """W += U_r diag(delta) V_r^T for every Linear the saved svd adapter wraps (in memory)."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    with torch.no_grad():
        for name in modules:
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise UserError(f"--adapter {directory}: {name} is not a Linear of this model")
            u, v, delta = (tensors[f"{name}.{k}"] for k in ("u_r", "v_r", "delta"))
            change = (u * delta[None]) @ v.T
            if tuple(change.shape) != tuple(linear.weight.shape):
                raise UserError(
                    f"--adapter {directory}: {name} has shape {tuple(change.shape)}, the model's "
                    f"is {tuple(linear.weight.shape)}"
                )
            linear.weight.add_(change.to(linear.weight.dtype).to(linear.weight.device))
    return model
