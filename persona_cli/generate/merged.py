"""A stack of LoRA adapters as one adapter, or merged into a base model, for vLLM.

vLLM serves one LoRA adapter per request on top of one base model. A stack (coupling adapter,
then a dose adapter trained on top of it) is served, in order of preference:
- `concatenated_lora(stack)`: one LoRA adapter whose rank is the sum of the stack's ranks,
  A = [A1; A2; ...] and B = [s1 B1, s2 B2, ...] (s_i = alpha_i / r_i, the new adapter's scale 1;
  a module only some adapters wrap gets zeros in the others' slices). Its delta is exactly
  s1 B1 A1 + s2 B2 A2 + ..., the sum a stacked merge adds to the base (W + d1 + d2), so every
  stack of an adapter set can be its own LoRARequest on the one plain base model of one engine.
  Possible for plain LoRA adapters (no DoRA, modules_to_save, rank or alpha patterns, biases).
- otherwise `merged_dir(model, stack[:-1])`: every adapter but the last merged into a base model
  directory, the last served as a LoRA; such a stack needs an engine of its own (its base).
Both are built once and cached under `$PERSONA_CLI_HOME/merged/`, keyed by the base model's
fingerprint and the adapters' weight hashes in order, so a changed adapter never reuses a stale
build.

    python -c "from persona_cli.generate.merged import concatenated_lora; help(concatenated_lora)"
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_cli.adapters import WEIGHTS, Adapter, load_with_adapters, stack_record
from persona_cli.artifacts import read_json, sha256_json, write_json
from persona_cli.models import ResolvedModel, home, load_tokenizer

log = logging.getLogger(__name__)

RECORD = "persona_cli_merged.json"


def merged_root() -> Path:
    return home() / "merged"


def merge_key(model: ResolvedModel, stack: list[Adapter]) -> str:
    return sha256_json(
        {"base": [model.path, model.revision], "adapters": [a.weights_sha256 for a in stack]}
    )[:24]


def _cached(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp)` into a scratch directory renamed onto it, once."""
    if (final / RECORD).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Two jobs of a sweep may need the same build at once: one builds, the other waits.
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (final / RECORD).is_file():
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
                try:
                    build(tmp)
                    if final.exists():
                        shutil.rmtree(final)
                    os.replace(tmp, final)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def merged_dir(model: ResolvedModel, stack: list[Adapter]) -> Path:
    """The directory holding `model` with every adapter of `stack` merged in (built once)."""
    return _cached(merged_root() / merge_key(model, stack), lambda tmp: _build(model, stack, tmp))


def _build(model: ResolvedModel, stack: list[Adapter], tmp: Path) -> None:
    import torch
    from transformers import AutoConfig

    log.info("merging %d adapter(s) into %s for vLLM", len(stack), model.spec)
    native = AutoConfig.from_pretrained(model.path).dtype or torch.float32
    # Merge in fp32 on the CPU (exact sums), then store in the checkpoint's own dtype.
    merged = load_with_adapters(model, stack, dtype="float32", device="cpu").to(native)
    merged.save_pretrained(tmp)
    load_tokenizer(model).save_pretrained(tmp)
    write_json(
        tmp / RECORD,
        {
            "schema_version": 1,
            "base_model": model.to_dict(),
            "adapters": stack_record(stack),
            "dtype": str(native).removeprefix("torch."),
        },
    )


# adapter_config.json keys whose non-default values a concatenation cannot carry.
_PLAIN_LORA = {
    "peft_type": "LORA",
    "modules_to_save": None,
    "use_dora": False,
    "layer_replication": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def _plain_config(adapter: Adapter) -> dict[str, Any] | None:
    """The adapter's config when it is a plain LoRA adapter (see _PLAIN_LORA), else None."""
    cfg = read_json(adapter.path / "adapter_config.json")
    for key, plain in _PLAIN_LORA.items():
        value = cfg.get(key, plain)  # a key an older PEFT did not write has its default
        if value != plain and (value or plain):
            return None
    return cfg


def can_concatenate(stack: list[Adapter]) -> bool:
    return all(_plain_config(a) is not None for a in stack)


def concatenated_lora(stack: list[Adapter]) -> Path:
    """One LoRA adapter directory equal to the stack's adapters merged in order (module doc);
    the stack must pass `can_concatenate`."""
    key = sha256_json({"concatenated": [a.weights_sha256 for a in stack]})[:24]
    return _cached(merged_root() / f"lora-{key}", lambda tmp: _concatenate(stack, tmp))


def _concatenate(stack: list[Adapter], tmp: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    configs = [_plain_config(a) for a in stack]
    if any(c is None for c in configs):
        raise ValueError("not every adapter of the stack is a plain LoRA adapter")
    parts = []  # (weights by module, rank, scale)
    for a, cfg in zip(stack, configs, strict=True):
        assert cfg is not None
        r = int(cfg["r"])
        scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        modules: dict[str, dict[str, Any]] = {}
        for name, tensor in load_file(str(a.path / WEIGHTS)).items():
            module, _, which = name.rpartition(".lora_")
            if which not in ("A.weight", "B.weight"):
                raise ValueError(f"{a.path}: unexpected tensor {name}")
            modules.setdefault(module, {})[which[0]] = tensor.float()
        parts.append((modules, r, scale))
    total = sum(r for _, r, _ in parts)
    names = sorted({m for modules, _, _ in parts for m in modules})
    out: dict[str, Any] = {}
    for module in names:
        shapes = next(mods[module] for mods, _, _ in parts if module in mods)
        a_cat = torch.zeros(total, shapes["A"].shape[1])
        b_cat = torch.zeros(shapes["B"].shape[0], total)
        offset = 0
        for modules, r, scale in parts:
            if module in modules:
                a_cat[offset : offset + r] = modules[module]["A"]
                b_cat[:, offset : offset + r] = scale * modules[module]["B"]
            offset += r
        out[f"{module}.lora_A.weight"] = a_cat.contiguous()
        out[f"{module}.lora_B.weight"] = b_cat.contiguous()
    targets = sorted({t for c in configs if c is not None for t in c["target_modules"]})
    first = dict(configs[0] or {})
    first.update(
        r=total,
        lora_alpha=total,  # scale 1: each part's own scale is folded into its B
        use_rslora=False,
        target_modules=targets,
        rank_pattern={},
        alpha_pattern={},
        lora_dropout=0.0,
    )
    save_file(out, str(tmp / WEIGHTS))
    write_json(tmp / "adapter_config.json", first)
    write_json(
        tmp / RECORD,
        {"schema_version": 1, "kind": "concatenated_lora", "adapters": stack_record(stack)},
    )
