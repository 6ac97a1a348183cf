"""`v_hack.safetensors`: the hack direction, one tensor per adapter tensor, plus its metadata.

Tensor keys are the adapter layout's keys (`<module>.lora_A`, `<module>.lora_B` or
`<module>.delta`, module = the wrapped Linear's name in the base model). Safetensors metadata is
str -> str, so everything else is one JSON document under the key `persona_cli`:

    schema_version, model (spec, kind, path, revision fingerprint), adapter (kind, rank, alpha,
    targets, layers, seed, modules, parameters), loss, counts (hack, clean, skipped),
    sources (file -> sha256), rows_sha256 (hash of the rows-used list), norm, module_norms

`load_vhack` checks it against the model a later stage is run on, so a v_hack taken on another
model (or another adapter init) is one clear error instead of meaningless cosines.

    tensors, meta = load_vhack("runs/vhack/v_hack.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import torch

from persona_cli.artifacts import write_bytes_atomic
from persona_cli.errors import InputError, UserError
from persona_cli.models import ResolvedModel
from persona_cli.probe.adapters import ProbeAdapter
from persona_cli.schemas import VHACK_TENSORS

FILENAME = "v_hack.safetensors"
META_KEY = "persona_cli"
SCHEMA_VERSION = VHACK_TENSORS.version


def vhack_path(path: str | Path) -> Path:
    """Accept an extract-vhack run directory or the safetensors file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
    if not p.is_file():
        raise InputError(path, f"no {FILENAME} here (run extract-vhack first)")
    return p


def save_vhack(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    data = save(
        {k: t.detach().float().contiguous().cpu() for k, t in tensors.items()},
        metadata={META_KEY: orjson.dumps({"schema_version": SCHEMA_VERSION, **meta}).decode()},
    )
    write_bytes_atomic(path, data)


def load_vhack(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    p = vhack_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise InputError(p, f"not a readable safetensors file ({e})") from None
    if raw is None:
        raise InputError(p, f"no '{META_KEY}' metadata: not written by extract-vhack")
    try:
        meta = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InputError(p, f"metadata '{META_KEY}' is not JSON") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise InputError(p, f"metadata schema_version {meta.get('schema_version')!r}, expected 1")
    return tensors, meta


def check_model(meta: dict[str, Any], model: ResolvedModel, source: str | Path) -> None:
    """Refuse a v_hack extracted on another model than `model`."""
    theirs = meta["model"]
    if theirs.get("revision") != model.revision or (
        model.revision is None and theirs.get("path") != model.path
    ):
        raise UserError(
            f"--vhack {source}: extracted on model {theirs.get('spec')!r} (fingerprint "
            f"{str(theirs.get('revision'))[:12]}), not on {model.spec!r} (fingerprint "
            f"{str(model.revision)[:12]}); extract it on this model"
        )


def check_layout(
    tensors: dict[str, torch.Tensor], adapter: ProbeAdapter, source: str | Path
) -> None:
    """The v_hack tensors must be exactly the adapter's tensors, shape for shape."""
    ours = {t.key: t.shape for t in adapter.tensors}
    missing = sorted(set(ours) - set(tensors))
    extra = sorted(set(tensors) - set(ours))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise UserError(f"--vhack {source}: tensors do not match the adapter ({what})")
    for key, shape in ours.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(
                f"--vhack {source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"the adapter's is {shape}"
            )
