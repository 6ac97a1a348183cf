"""LoRA (and svd-delta) adapters as PEFT directories, with the base model and the stack they
were trained on.

A training run saves its adapter to `RUN/adapter/` (PEFT's own files) plus
`persona_cli_adapter.json`: the base model it was trained on (spec, path, fingerprint), the
stack of earlier adapters merged into the base first (the dose-response design trains on top of
a coupling adapter), and the sha256 of the adapter weights. Loading checks that record against
the model the user names, so an adapter from another base model is one clear error instead of
silently wrong outputs.

An adapter spec is one of
- a training run directory (its `adapter/`) or a PEFT directory;
- `RUN@step_N`: the checkpoint a training run kept at optimizer step N (`train-sft --save-at`,
  saved as `RUN/checkpoints/step_N/`);
- `hf:ORG/REPO[@REVISION][:SUBFOLDER]`: a PEFT directory in a hub repository (`persona_cli.hub`);
  the commit the revision resolved to is recorded with the adapter.

    stack = resolve_stack(["runs/couple", "runs/dose_em_25"])   # run dirs or adapter dirs
    check_stack(stack, resolved_model)
    model = load_with_adapters(resolved_model, stack)            # all merged, for inference
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli import hub
from persona_cli.artifacts import read_json, sha256_file, write_json
from persona_cli.errors import UserError
from persona_cli.models import ResolvedModel, load_model

RECORD = "persona_cli_adapter.json"
WEIGHTS = "adapter_model.safetensors"
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step_N/: adapters kept at chosen steps
_STEP = re.compile(r"step_(\d+)")


@dataclass(frozen=True)
class Adapter:
    path: Path  # the PEFT directory
    weights_sha256: str
    base_fingerprint: str | None  # None for a PEFT dir persona-cli did not write
    base_spec: str | None
    parents: tuple[str, ...]  # weights hashes of the adapters merged under this one
    spec: str | None = None  # as given, when it was not a plain path (RUN@step_N, hf:...)
    hub: dict[str, Any] | None = None  # repo, revision asked, subfolder, resolved commit
    checkpoint_step: int | None = None  # RUN@step_N: N

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["parents"] = list(self.parents)
        return d


def step_dir(run: str | Path, step: int) -> Path:
    """Where a training run keeps its adapter of optimizer step `step` (`--save-at`)."""
    return Path(run) / CHECKPOINTS / f"step_{step}"


def checkpoint_of(adapter_path: str | Path) -> tuple[Path, int] | None:
    """(training run directory, step) when `adapter_path` is a RUN/checkpoints/step_N dir."""
    p = Path(adapter_path)
    m = _STEP.fullmatch(p.name)
    if m and p.parent.name == CHECKPOINTS:
        return p.parent.parent, int(m.group(1))
    return None


def split_step(spec: str) -> tuple[str, int] | None:
    """`RUN@step_N` -> (RUN, N); None for any other spec."""
    head, at, tail = str(spec).rpartition("@")
    m = _STEP.fullmatch(tail)
    return (head, int(m.group(1))) if at and head and m else None


def adapter_dir(path: str | Path) -> Path:
    """Accept a training run directory (uses RUN/adapter), `RUN@step_N`, or a PEFT directory
    itself (hub specs are resolved by `read_adapter`)."""
    stepped = split_step(str(path))
    if stepped is not None:
        run, step = stepped
        d = step_dir(run, step)
        if not (d / "adapter_config.json").is_file():
            kept = sorted(
                int(m.group(1))
                for c in (Path(run) / CHECKPOINTS).glob("step_*")
                if (m := _STEP.fullmatch(c.name)) and (c / RECORD).is_file()
            )
            raise UserError(
                f"--adapter {path}: {run} kept no adapter at step {step} (kept: "
                f"{', '.join(map(str, kept)) or 'none'}; train with --save-at to keep some)"
            )
        return d
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "adapter_config.json").is_file():
        return p
    raise UserError(f"--adapter {path}: not a PEFT adapter directory or a training run with one")


def read_adapter(path: str | Path) -> Adapter:
    snapshot = hub.resolve(str(path)) if hub.is_hub_spec(str(path)) else None
    d = snapshot.path if snapshot is not None else adapter_dir(path)
    if snapshot is not None and not (d / "adapter_config.json").is_file():
        raise UserError(f"--adapter {path}: no adapter_config.json at commit {snapshot.commit}")
    weights = d / WEIGHTS
    if not weights.is_file():
        raise UserError(f"--adapter {path}: {WEIGHTS} missing (unfinished training run?)")
    # A PEFT directory persona-cli did not write (a hub adapter, say) has no record.
    record = read_json(d / RECORD) if (d / RECORD).is_file() else {}
    stepped = split_step(str(path))
    plain = snapshot is None and stepped is None
    return Adapter(
        path=d,
        weights_sha256=sha256_file(weights),
        base_fingerprint=record.get("base_model", {}).get("revision"),
        base_spec=record.get("base_model", {}).get("spec"),
        parents=tuple(record.get("parents", [])),
        spec=None if plain else str(path),
        hub=None if snapshot is None else {**snapshot.spec.to_dict(), "commit": snapshot.commit},
        checkpoint_step=None if stepped is None else stepped[1],
    )


def resolve_stack(paths: list[str | Path]) -> list[Adapter]:
    return [read_adapter(p) for p in paths]


def check_stack(stack: list[Adapter], model: ResolvedModel) -> None:
    """Refuse adapters trained on another base, or stacked in another order than trained."""
    for i, a in enumerate(stack):
        if (
            a.base_fingerprint is not None
            and model.revision is not None
            and a.base_fingerprint != model.revision
        ):
            raise UserError(
                f"--adapter {a.path}: trained on base model {a.base_spec!r} "
                f"(fingerprint {a.base_fingerprint[:12]}), not on {model.spec!r} "
                f"(fingerprint {model.revision[:12]})"
            )
        below = tuple(x.weights_sha256 for x in stack[:i])
        if a.base_fingerprint is not None and a.parents != below:
            raise UserError(
                f"--adapter {a.path}: was trained on top of {len(a.parents)} adapter(s) "
                f"{[p[:12] for p in a.parents]}, but is stacked on {[p[:12] for p in below]}; "
                "pass the same --adapter chain, in training order"
            )


def write_record(
    adapter_path: Path,
    model: ResolvedModel,
    parents: list[Adapter],
    checkpoint: dict[str, Any] | None = None,
) -> None:
    """Called by training after PEFT's save_pretrained, so the record describes the weights.
    `checkpoint` ({"step", "schedule_steps"}) marks an adapter kept part-way through a run."""
    record: dict[str, Any] = {
        "schema_version": 1,
        "base_model": model.to_dict(),
        "parents": [p.weights_sha256 for p in parents],
        "parent_paths": [str(p.path) for p in parents],
        "weights_sha256": sha256_file(adapter_path / WEIGHTS),
    }
    if checkpoint is not None:
        record["checkpoint"] = checkpoint
    write_json(adapter_path / RECORD, record)


def merge_into(model: Any, stack: list[Adapter]) -> Any:
    """Merge each adapter of `stack` into `model` in order (in memory); returns the plain model.
    A PEFT LoRA directory merges through PEFT; an svd-delta directory (train-grpo
    --adapter-kind svd, `persona_cli.probe.adapters.save_svd_adapter`) adds its
    U_r diag(delta) V_r^T to each wrapped weight."""
    from peft import PeftModel

    from persona_cli.probe.adapters import is_svd_adapter_dir, merge_svd_adapter

    for a in stack:
        if is_svd_adapter_dir(a.path):
            model = merge_svd_adapter(model, a.path)
        else:
            model = PeftModel.from_pretrained(model, str(a.path)).merge_and_unload()
    return model


def load_with_adapters(
    model: ResolvedModel, stack: list[Adapter], *, dtype: str = "auto", device: str = "auto"
) -> Any:
    check_stack(stack, model)
    return merge_into(load_model(model, dtype=dtype, device=device), stack)


def stack_record(stack: list[Adapter]) -> list[dict[str, Any]]:
    """The manifest's `adapters` entry."""
    return [a.to_dict() for a in stack]
