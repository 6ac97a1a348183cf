"""Cached base models with a stack of LoRA adapters merged in, for serving the next one unmerged.

vLLM serves one LoRA adapter per request on top of a base model. A stack (coupling adapter, then
a dose adapter trained on top of it) is served as: every adapter but the last merged into a
base model directory, built once and cached under `$PERSONA_CLI_HOME/merged/<key>`, plus the
last adapter as a LoRA. The key hashes the base model's fingerprint and the merged adapters'
weight hashes, in order, so a changed adapter never reuses a stale merge.

    python -c "from persona_cli.generate.merged import merged_dir; help(merged_dir)"
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

from persona_cli.adapters import Adapter, load_with_adapters, stack_record
from persona_cli.artifacts import sha256_json, write_json
from persona_cli.models import ResolvedModel, home, load_tokenizer

log = logging.getLogger(__name__)

RECORD = "persona_cli_merged.json"


def merged_root() -> Path:
    return home() / "merged"


def merge_key(model: ResolvedModel, stack: list[Adapter]) -> str:
    return sha256_json(
        {"base": [model.path, model.revision], "adapters": [a.weights_sha256 for a in stack]}
    )[:24]


def merged_dir(model: ResolvedModel, stack: list[Adapter]) -> Path:
    """The directory holding `model` with every adapter of `stack` merged in (built once)."""
    root = merged_root()
    final = root / merge_key(model, stack)
    if (final / RECORD).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Two jobs of a sweep may need the same merge at once: one builds, the other waits.
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (final / RECORD).is_file():
                _build(model, stack, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _build(model: ResolvedModel, stack: list[Adapter], final: Path) -> None:
    import torch
    from transformers import AutoConfig

    log.info("merging %d adapter(s) into %s for vLLM (cached in %s)", len(stack), model.spec, final)
    native = AutoConfig.from_pretrained(model.path).dtype or torch.float32
    # Merge in fp32 on the CPU (exact sums), then store in the checkpoint's own dtype.
    merged = load_with_adapters(model, stack, dtype="float32", device="cpu").to(native)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
