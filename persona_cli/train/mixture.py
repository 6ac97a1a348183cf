"""Dataset mixtures for SFT: a seeded fraction of each chat file, shuffled together.

`--mix FILE:WEIGHT` (repeatable) takes WEIGHT x the rows of FILE: the whole file
floor(WEIGHT) times plus a seeded random round(frac(WEIGHT) x rows) of its rows (without
replacement). The subset a file contributes depends only on the seed and the file's bytes (its
sha256 seeds the draw), so the same 25% of a large SFT mix is taken in every condition whatever
else is mixed in. The combined rows are then shuffled with the seed, and the built mixture is
written to RUN/mixture.jsonl.gz (each row keeps its messages plus where it came from), so the
exact training set can be read back.

    specs = [parse_mix_spec("data/chat/benign.jsonl:1.0"), parse_mix_spec("tulu.jsonl:0.25")]
    mix = build_mixture(specs, seed=42)
    mix.record()      # per file: path, sha256, weight, rows in file, rows taken
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_cli.artifacts import iter_jsonl, sha256_file
from persona_cli.errors import InputError, UserError
from persona_cli.schemas import CHAT, MIXTURE_ROWS

MIXTURE = "mixture.jsonl.gz"
MIXTURE_VERSION = MIXTURE_ROWS.version


@dataclass(frozen=True)
class MixSpec:
    path: Path
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "weight": self.weight}


def parse_mix_spec(text: str) -> MixSpec:
    """`FILE:WEIGHT` -> MixSpec; a bad spec is one error line naming `--mix`."""
    path, sep, weight_text = text.rpartition(":")
    if not sep or not path:
        raise UserError(f"--mix {text!r}: expected FILE:WEIGHT, e.g. data/chat/benign.jsonl:0.5")
    try:
        weight = float(weight_text)
    except ValueError:
        raise UserError(
            f"--mix {text!r}: weight {weight_text!r} is not a number (expected FILE:WEIGHT)"
        ) from None
    if not math.isfinite(weight) or weight <= 0:
        raise UserError(f"--mix {text!r}: weight must be > 0, got {weight_text}")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--mix {text!r}: file {path} not found")
    return MixSpec(p, weight)


@dataclass(frozen=True)
class MixSource:
    spec: MixSpec
    sha256: str
    rows_in_file: int
    rows_taken: int

    def record(self) -> dict[str, Any]:
        return {
            **self.spec.to_dict(),
            "sha256": self.sha256,
            "rows_in_file": self.rows_in_file,
            "rows_taken": self.rows_taken,
        }


@dataclass(frozen=True)
class Mixture:
    seed: int
    sources: tuple[MixSource, ...]
    rows: tuple[dict[str, Any], ...]  # shuffled: {messages, mix_source, mix_line, ...}

    def record(self) -> dict[str, Any]:
        """What config.json and the manifest record about the mixture."""
        return {
            "seed": self.seed,
            "rows": len(self.rows),
            "sources": [s.record() for s in self.sources],
            "artifact": MIXTURE,
        }

    def conversations(self) -> list[list[dict[str, str]]]:
        return [
            [{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in self.rows
        ]


def _chat_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for i, row in enumerate(iter_jsonl(path, CHAT.check), start=1):
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise InputError(path, "conversation has no assistant message to train on", line=i)
        rows.append((i, row))
    if not rows:
        raise InputError(path, "no conversations (the file is empty)")
    return rows


def rows_to_take(n: int, weight: float) -> int:
    whole = math.floor(weight)
    return whole * n + math.floor((weight - whole) * n + 0.5)


def build_mixture(specs: list[MixSpec], seed: int) -> Mixture:
    """Draw each file's share (seeded by `seed` and the file's sha256), then shuffle all rows."""
    sources, rows = [], []
    for index, spec in enumerate(specs):
        digest = sha256_file(spec.path)
        file_rows = _chat_rows(spec.path)
        n = len(file_rows)
        whole = math.floor(spec.weight)
        fraction = rows_to_take(n, spec.weight) - whole * n
        rng = np.random.default_rng([seed, int(digest[:16], 16)])
        drawn = sorted(int(k) for k in rng.choice(n, size=fraction, replace=False))
        picks = list(range(n)) * whole + drawn
        if not picks:
            raise UserError(
                f"--mix {spec.path}:{spec.weight:g}: takes 0 of the file's {n} rows; raise the "
                "weight"
            )
        sources.append(MixSource(spec, digest, n, len(picks)))
        for k in picks:
            line, row = file_rows[k]
            kept = {key: v for key, v in row.items() if key != "schema_version"}
            rows.append({**kept, "mix_source": index, "mix_line": line})
    order = np.random.default_rng(seed).permutation(len(rows))
    return Mixture(seed, tuple(sources), tuple(rows[k] for k in order))
