"""The protocol guard: runs produced differently are never silently compared.

`protocol_of(run)` reads a finished run's guarded fields (`persona_cli.protocol.recorded_fields`,
both manifest schemas) and, following its adapter stack, those of the training run behind each
adapter as `stage[i].FIELD` (an adapter whose run directory is gone is compared by its weights
hash). `check_protocols` lists every field whose values differ across runs, split into refused
and declared (`--allow-diff FIELD` for every stage, `--allow-diff stage[i].FIELD` for one);
`guard_runs` raises `ProtocolMismatch` (exit 3) on a refused one. `stats`, `compare`, `report` and
`dose-sweep summarize` all go through `check_protocols`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.adapters import checkpoint_of
from persona_cli.artifacts import read_json
from persona_cli.errors import EXIT_PROTOCOL, InputError, UserError
from persona_cli.protocol import GUARDED_FIELDS, run_fields
from persona_cli.schemas import CONFIG, MANIFEST


def _training_run_of(adapter_path: str) -> Path | None:
    """The run directory that wrote an adapter (RUN/adapter), when it is one."""
    p = Path(adapter_path)
    run = p.parent if p.name == "adapter" else p
    return run if (run / MANIFEST).is_file() else None


def lineage_seed(run: str | Path) -> int | None:
    """The seed a run records; for a run without one (eval-capability, judge-align: nothing
    random), the seed of the run it derives from: the training run behind its last adapter,
    else the run directory holding one of its input files. None when no ancestor has one."""
    seen: set[Path] = set()

    def walk(r: Path) -> int | None:
        if r in seen or not (r / MANIFEST).is_file():
            return None
        seen.add(r)
        manifest = read_json(r / MANIFEST)
        if manifest.get("seeds"):
            return int(manifest["seeds"][0])
        if (r / CONFIG).is_file():
            seed = read_json(r / CONFIG).get("config", {}).get("seed")
            if seed is not None:
                return int(seed)
        parents = [_training_run_of(a["path"]) for a in reversed(manifest.get("adapters") or [])]
        parents += [Path(i["path"]).parent for i in (manifest.get("inputs") or {}).values()]
        for parent in parents:
            found = walk(parent.resolve()) if parent is not None else None
            if found is not None:
                return found
        return None

    return walk(Path(run).resolve())


def _stage_fields(adapter_path: str) -> dict[str, Any] | None:
    """The guarded fields of the training run behind an adapter: for a --save-at checkpoint
    (RUN/checkpoints/step_N) the run's fields with `optimizer_steps` N and `schedule` one-run
    (N steps of a longer schedule). None when the run directory is gone."""
    checkpoint = checkpoint_of(adapter_path)
    if checkpoint is not None:
        run, step = checkpoint
        if not (run / MANIFEST).is_file():
            return None
        return run_fields(run) | {"optimizer_steps": step, "schedule": "one-run"}
    source = _training_run_of(adapter_path)
    return None if source is None else run_fields(source)


def protocol_of(run: str | Path) -> dict[str, Any]:
    """Flattened protocol of a finished run: its own fields, then `stage[i].FIELD` for the
    training run behind the i-th adapter of its stack (when that run directory still exists)."""
    run = Path(run)
    manifest = read_json(run / MANIFEST)
    fields = run_fields(run, manifest)
    for i, adapter in enumerate(manifest.get("adapters") or []):
        stage = _stage_fields(adapter["path"])
        if stage is None:
            fields[f"stage[{i}].adapter"] = adapter["weights_sha256"]
            continue
        for k, v in stage.items():
            fields[f"stage[{i}].{k}"] = v
    return fields


def field_name(key: str) -> str:
    """`stage[1].learning_rate` -> `learning_rate`."""
    return key.split(".", 1)[1] if key.startswith("stage[") else key


@dataclass(frozen=True)
class ProtocolDifference:
    field: str
    values: dict[str, list[str]]  # rendered value -> runs holding it

    def describe(self) -> str:
        parts = [f"{value} in {', '.join(runs)}" for value, runs in self.values.items()]
        return f"{self.field}: " + " vs ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "values": self.values}


def check_allow_diff(allow_diff: Iterable[str]) -> set[str]:
    """`--allow-diff` names: a guarded field, or `stage[i].FIELD` for one stage only."""
    allowed = set(allow_diff)
    unknown = sorted(a for a in allowed if field_name(a) not in GUARDED_FIELDS)
    if unknown:
        raise UserError(
            f"--allow-diff {unknown[0]!r}: not a guarded field "
            f"(choose from {', '.join(GUARDED_FIELDS)}; or stage[i].FIELD)"
        )
    return allowed


def check_protocols(
    runs: dict[str, dict[str, Any]], allow_diff: Iterable[str]
) -> tuple[list[ProtocolDifference], list[ProtocolDifference]]:
    """Compare the protocols of `runs` (label -> protocol). Returns (refused, allowed): the
    differing fields not declared, and those declared with `--allow-diff` (reported anyway)."""
    allowed_names = check_allow_diff(allow_diff)
    order = list(GUARDED_FIELDS)
    keys = sorted(
        {k for p in runs.values() for k in p},
        key=lambda k: (order.index(field_name(k)) if field_name(k) in order else len(order), k),
    )
    refused, allowed = [], []
    for key in keys:
        groups: dict[str, list[str]] = {}
        for label, proto in runs.items():
            value = repr(proto[key]) if key in proto else "<absent>"
            groups.setdefault(value, []).append(label)
        if len(groups) > 1:
            diff = ProtocolDifference(key, groups)
            declared = key in allowed_names or field_name(key) in allowed_names
            (allowed if declared else refused).append(diff)
    return refused, allowed


class ProtocolMismatch(UserError):
    exit_code = EXIT_PROTOCOL

    def __init__(self, differences: list[ProtocolDifference]):
        self.differences = differences
        names = ", ".join(d.field for d in differences)
        super().__init__(
            f"refusing to compare runs whose protocols differ in: {names} "
            "(pass --allow-diff FIELD to declare a difference as the manipulation)",
            exit_code=EXIT_PROTOCOL,
        )


def guard_protocols(
    protocols: dict[str, dict[str, Any]], allow_diff: Iterable[str] = ()
) -> list[ProtocolDifference]:
    """`check_protocols` that raises `ProtocolMismatch` (exit 3) on a difference not in
    `allow_diff`; returns the declared differences, which callers report beside their results."""
    refused, allowed = check_protocols(protocols, allow_diff)
    if refused:
        raise ProtocolMismatch(refused)
    return allowed


def guard_runs(runs: dict[str, Path], allow_diff: Iterable[str] = ()) -> list[ProtocolDifference]:
    """The protocol guard for finished run directories (label -> run)."""
    return guard_protocols({k: protocol_of(r) for k, r in runs.items()}, allow_diff)


def metric_value(summary: dict[str, Any], path: str, source: str | Path) -> float:
    """Read a dotted path (`source.rate`, `personas.assistant.rate`) from a summary."""
    node: Any = summary
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            here = sorted(node) if isinstance(node, dict) else []
            raise InputError(
                source,
                f"no metric {path!r} (at {part!r}; keys here: {', '.join(map(str, here[:12]))})",
            )
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise InputError(source, f"metric {path!r} is {node!r}, not a number")
    return float(node)
