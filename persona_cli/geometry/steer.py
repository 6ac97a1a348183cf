"""Steering and ablation: forward hooks that move the residual stream along a vector.

Layers are numbered as `persona_cli.geometry.hidden` numbers hidden states: layer L (1..n) is
the output of decoder block L (`hidden_states[L]`); the hook is a forward hook on that block, so
everything after it (later blocks, the logits, generation) sees the edited stream. For the last
block, transformers applies the final norm after the hook, so `hidden_states[n]` is the normed
edited stream. Layer 0 (the embeddings) is not a block and cannot be steered.

- `steer(model, layer, vector, coef, positions)`: adds coef * vector. `positions` (as
  safety-research/persona_vectors' ActivationSteerer): `all` every position of every forward
  pass; `prompt` every position of a pass over more than one token (the prompt's prefill), none
  while decoding; `response` the last position of every pass (the one whose logits give the
  next token: the last prompt token, then each generated token).
- `ablate(model, layer, vector)`: removes the component along the vector at every position,
  h - (h . u) u with u = vector / |vector|.
Both are context managers that remove their hook on exit, also on error.

At generation (`eval-markers --steer VECTORS:LAYER:COEF --ablate VECTORS:LAYER`, hf backend):
VECTORS is a `persona-vectors trait` run (or its trait.safetensors); the vector is its v_L,
unnormalised (coef is in units of |v_L|, as persona_vectors steers). `SteeringConfig` holds the
options, `resolve_interventions` checks them against the model before a run directory opens
(a vector of another model, a layer the trait lacks or the model cannot hook: one line, exit 2),
`intervening(model, interventions)` applies them all around the generate call, and
`Intervention.record()` is what the manifest's guarded `steering` / `ablation` fields hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import sha256_file
from persona_cli.errors import UserError
from persona_cli.eval.config import POSITIONS, SteeringConfig
from persona_cli.geometry.vectors import TRAIT_FILE, read_vectors
from persona_cli.rundir import is_done

STEER = "steer"
ABLATE = "ablate"


@dataclass(frozen=True)
class Intervention:
    """One resolved --steer or --ablate: the trait file, its layer's vector, the coefficient."""

    kind: str  # STEER or ABLATE
    path: Path  # the trait.safetensors read
    sha256: str
    layer: int
    vector: np.ndarray = field(repr=False)  # v_layer, [hidden] float64
    coef: float | None = None  # steer only
    positions: str | None = None  # steer only

    def record(self) -> dict[str, Any]:
        """What the manifest's guarded field holds (the vector by its file's sha256)."""
        out = {"vectors_sha256": self.sha256, "layer": self.layer}
        if self.kind == STEER:
            out |= {"coef": self.coef, "positions": self.positions}
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["vector"]
        return d | {"path": str(self.path)}


def _trait_file(spec: str, option: str) -> Path:
    p = Path(spec)
    path = p / TRAIT_FILE if p.is_dir() else p
    if not path.is_file() or not is_done(path.parent):
        raise UserError(
            f"{option} {spec}: no {TRAIT_FILE} (not a finished persona-vectors trait run)"
        )
    return path


def _parse(option: str, value: str, parts: int) -> list[str]:
    fields = value.rsplit(":", parts - 1)
    if len(fields) != parts or not all(fields):
        shape = "VECTORS:LAYER:COEF" if parts == 3 else "VECTORS:LAYER"
        raise UserError(f"{option} {value!r}: expected {shape}")
    return fields


def resolve_interventions(
    cfg: SteeringConfig, *, model_revision: str | None, model_spec: str, n_blocks: int,
    hidden_size: int,
) -> list[Intervention]:  # fmt: skip
    """Check every --steer / --ablate against the model (one line, exit 2 on a problem) and
    read its vector. Ablations come first, then steering, each in the order given."""
    if cfg.positions not in POSITIONS:
        raise UserError(f"--steer-positions {cfg.positions!r}: choose from {', '.join(POSITIONS)}")
    out = []
    asked = [(ABLATE, "--ablate", v) for v in cfg.ablate] + [
        (STEER, "--steer", v) for v in cfg.steer
    ]
    for kind, option, value in asked:
        fields = _parse(option, value, 3 if kind == STEER else 2)
        path = _trait_file(fields[0], option)
        try:
            layer = int(fields[1])
            coef = float(fields[2]) if kind == STEER else None
        except ValueError:
            raise UserError(
                f"{option} {value!r}: LAYER must be an integer, COEF a number"
            ) from None
        tensors, meta = read_vectors(path)
        if meta.model["revision"] != model_revision:
            raise UserError(
                f"{option} {value}: a vector of model {meta.model['spec']!r}, not of this run's "
                f"model {model_spec!r} (fingerprints differ)"
            )
        if not 1 <= layer <= n_blocks:
            raise UserError(
                f"{option} {value}: layer {layer} is out of range; this model has blocks "
                f"1..{n_blocks} (layer 0, the embeddings, cannot be steered)"
            )
        if layer not in meta.layers:
            raise UserError(
                f"{option} {value}: {path} has no vector at layer {layer} (it has layers "
                f"{','.join(map(str, meta.layers))})"
            )
        vector = tensors[meta.methods[0]][meta.layers.index(layer)].astype(np.float64)
        if vector.shape != (hidden_size,):
            raise UserError(
                f"{option} {value}: vector of size {vector.shape[0]}, model {hidden_size}"
            )
        if kind == ABLATE and not np.linalg.norm(vector) > 0:
            raise UserError(f"{option} {value}: the vector is zero; it has no direction to remove")
        out.append(
            Intervention(kind, path, sha256_file(path), layer, vector, coef,
                         cfg.positions if kind == STEER else None)
        )  # fmt: skip
    return out


def replay(recorded: Sequence[dict[str, Any]], where: str) -> list[Intervention]:
    """The interventions a run recorded in its config (`Intervention.to_dict()`), read again
    from their files for a forward pass over the whole sequence: ablations, and steering at
    `all` positions (at `prompt` / `response` the steered positions depended on how generation
    split its forward passes, which one pass over the finished text cannot repeat)."""
    out = []
    for d in recorded:
        path = Path(d["path"])
        if not path.is_file() or sha256_file(path) != d["sha256"]:
            raise UserError(f"{where}: its {d['kind']} vector {path} is gone or was changed")
        if d["kind"] == STEER and d["positions"] != "all":
            raise UserError(
                f"{where}: was steered at {d['positions']} positions; only steering at all "
                "positions and ablation can be replayed over the finished text"
            )
        tensors, meta = read_vectors(path)
        vector = tensors[meta.methods[0]][meta.layers.index(d["layer"])].astype(np.float64)
        out.append(
            Intervention(d["kind"], path, d["sha256"], d["layer"], vector, d["coef"],
                         d["positions"])
        )  # fmt: skip
    return out


def records(interventions: Sequence[Intervention]) -> dict[str, list[dict[str, Any]]]:
    """The guarded `steering` / `ablation` fields of a run with these interventions (a field is
    absent when it has none, so runs without any compare as before)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, name in ((STEER, "steering"), (ABLATE, "ablation")):
        mine = [i.record() for i in interventions if i.kind == kind]
        if mine:
            out[name] = mine
    return out


def input_files(interventions: Sequence[Intervention]) -> dict[str, Path]:
    """Manifest inputs (name -> file), so each vector file's sha256 is recorded."""
    return {f"{i.kind}_{n}": i.path for n, i in enumerate(interventions)}


@contextmanager
def intervening(model: Any, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Apply every intervention while the context is open (no-op for none)."""
    # Hooks are prepended, so the last one registered runs first: register the steering, then
    # the ablations, and every ablation runs before any steering on the same block.
    with ExitStack() as stack:
        for i in sorted(interventions, key=lambda i: i.kind == ABLATE):
            if i.kind == ABLATE:
                stack.enter_context(ablate(model, i.layer, i.vector))
            else:
                stack.enter_context(
                    steer(model, i.layer, i.vector, float(i.coef or 0.0), i.positions or "all")
                )
        yield


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
def steer(
    model: Any, layer: int, vector: np.ndarray, coef: float, positions: str = "all"
) -> Iterator[None]:
    """Add coef * vector to the output of decoder block `layer` while the context is open, at
    `positions` (see module doc)."""
    if positions not in POSITIONS:
        raise UserError(f"steering positions {positions!r}: choose from {', '.join(POSITIONS)}")
    v = _as_tensor(model, vector) * coef

    def edit(h: Any) -> Any:
        if positions == "all":
            return h + v
        if positions == "prompt":
            return h + v if h.shape[1] > 1 else h
        out = h.clone()
        out[:, -1, :] += v
        return out

    with _hooked(model, layer, edit):
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
