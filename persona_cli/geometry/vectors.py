"""The two tensor files of a `persona-vectors extract` run, and reading them back.

    centroids.safetensors         one tensor per method: [personas, layers, hidden] float32
    question_vectors.safetensors  one tensor per method: [personas, questions, layers, hidden]

A centroid is the mean over questions of that persona's per-question vectors, so a bootstrap
over questions recomputes centroids from the second file. Both files carry the same
safetensors metadata (strings; lists and mappings as JSON): schema_version, model, adapters
(each adapter's weights sha256, stack order), methods, layers, personas and questions (the
order of the tensor axes), question_set_sha256, template_sha256. Written atomically.
`persona-vectors trait` writes trait.safetensors with the same metadata: one tensor keyed by
its method, [layers, hidden], and `personas` = [positive, negative].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import write_bytes_atomic
from persona_cli.errors import InputError
from persona_cli.schemas import VECTORS

VECTORS_VERSION = VECTORS.version
CENTROIDS_FILE = "centroids.safetensors"
QUESTION_VECTORS_FILE = "question_vectors.safetensors"
TRAIT_FILE = "trait.safetensors"
_JSON_KEYS = ("model", "adapters", "methods", "layers", "personas", "questions")


@dataclass(frozen=True)
class VectorsMeta:
    """What the axes of the tensors mean and where they came from."""

    model: dict[str, Any]  # spec and revision (content fingerprint)
    adapters: list[str]  # weights sha256 per adapter, in stack order
    methods: list[str]
    layers: list[int]
    personas: list[str]
    questions: list[str]
    question_set_sha256: str
    template_sha256: str

    def to_metadata(self) -> dict[str, str]:
        meta = {"schema_version": str(VECTORS_VERSION)}
        for key, value in self.__dict__.items():
            meta[key] = json.dumps(value, sort_keys=True) if key in _JSON_KEYS else str(value)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: Path) -> VectorsMeta:
        if meta.get("schema_version") != str(VECTORS_VERSION):
            raise InputError(
                source,
                f"schema_version {meta.get('schema_version')!r}: this release reads "
                f"{VECTORS_VERSION}",
            )
        values = {k: json.loads(meta[k]) if k in _JSON_KEYS else meta[k] for k in cls.fields()}
        return cls(**values)

    @classmethod
    def fields(cls) -> list[str]:
        return list(cls.__dataclass_fields__)


def write_vectors(path: Path, tensors: dict[str, np.ndarray], meta: VectorsMeta) -> None:
    import torch
    from safetensors.torch import save

    data = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()
    }
    write_bytes_atomic(path, save(data, metadata=meta.to_metadata()))


def read_vectors(path: Path) -> tuple[dict[str, np.ndarray], VectorsMeta]:
    """The tensors (method -> float32 array) and metadata of one vectors file."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(path, "missing (not a finished persona-vectors extract run?)")
    with safe_open(str(path), framework="numpy") as f:
        meta = VectorsMeta.from_metadata(f.metadata() or {}, path)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    return tensors, meta
