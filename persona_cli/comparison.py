"""How two arms are compared (the count test and its alternative), declared without numpy so
commands can offer the options without importing the statistics (`persona_cli.stats`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from persona_cli.errors import UserError

ALTERNATIVES = ("two-sided", "less", "greater")  # scipy's names; "less" means group 1 < group 2
ADJUST_METHODS = ("none", "bonferroni", "holm")
COUNT_TESTS = ("auto", "fisher", "z")  # auto: Fisher when an expected count is < 5, else z


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """How two arms are tested; recorded in every summary that tests, so a table reproduces."""

    test: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "Count test: auto (Fisher when an expected count < 5, else z), fisher or z."
        },
    )
    alternative: str = dataclasses.field(
        default="two-sided",
        metadata={
            "help": "two-sided, less (arm 1 < arm 2) or greater (arm 1 > arm 2); "
            "applies to every test."
        },
    )

    def check(self) -> ComparisonConfig:
        for flag, value, choices in (
            ("--test", self.test, COUNT_TESTS),
            ("--alternative", self.alternative, ALTERNATIVES),
        ):
            if value not in choices:
                raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def describe_test(record: dict[str, Any]) -> str:
    """'welch, two-sided' or 'fisher, less, pooled': what a printed p-value comes from."""
    return ", ".join(
        [record["test"], record["alternative"], *(["pooled"] if record["pooled"] else [])]
    )


def format_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"
