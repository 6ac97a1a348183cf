"""What `compare-items` compares: its options, declared once (no numpy here: `--help` is fast;
the comparison is `persona_cli.paired`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from persona_cli import fields


@dataclass(frozen=True)
class CompareItemsConfig:
    a: str = field(metadata={"help": "Side A: a run directory or a GLOB of them (one per seed)."})
    b: str = field(metadata={"help": "Side B: a run directory or a GLOB of them (one per seed)."})
    grouping: str | None = field(
        default=None,
        metadata={
            "help": "Table and plot grouping: capability subject_class (default), subject, class;"
            " markers persona (default), question; judge question (default), persona."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the paired bootstrap (pair i: +i)."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the clusters."})
    alpha: float = field(default=0.05, metadata={"help": "1 - confidence of the intervals."})
    allow_diff: tuple[str, ...] = fields.allow_diff()
    plot: bool = field(
        default=False,
        metadata={"help": "Also write compare_items.png (flip matrix + per-group bars; --out)."},
    )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "allow_diff": list(self.allow_diff)}
