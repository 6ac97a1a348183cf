"""LoRA (and svd-delta) adapters as PEFT directories, with the base model and the stack they
were trained on.

A training run saves its adapter to `RUN/adapter/` (PEFT's own files) plus
`persona_cli_adapter.json`: the base model it was trained on (spec, path, fingerprint), the
stack of earlier adapters merged into the base first (the dose-response design trains on top of
a coupling adapter), and the sha256 of the adapter weights. Loading checks that record against
the model the user names, so an adapter from another base model is one clear error instead of
silently wrong outputs.

    stack = resolve_stack(["runs/couple", "runs/dose_em_25"])   # run dirs or adapter dirs
    check_stack(stack, resolved_model)
    model = load_with_adapters(resolved_model, stack)            # all merged, for inference
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_json, sha256_file, write_json
from persona_cli.errors import UserError
from persona_cli.models import ResolvedModel, load_model

RECORD = "persona_cli_adapter.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Adapter:
    path: Path  # the PEFT directory
    weights_sha256: str
    base_fingerprint: str | None  # None for a PEFT dir persona-cli did not write
    base_spec: str | None
    parents: tuple[str, ...]  # weights hashes of the adapters merged under this one

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["parents"] = list(self.parents)
        return d


def adapter_dir(path: str | Path) -> Path:
    """Accept a training run directory (uses RUN/adapter) or a PEFT directory itself."""
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "adapter_config.json").is_file():
        return p
    raise UserError(f"--adapter {path}: not a PEFT adapter directory or a training run with one")


def read_adapter(path: str | Path) -> Adapter:
    d = adapter_dir(path)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise UserError(f"--adapter {path}: {WEIGHTS} missing (unfinished training run?)")
    record = read_json(d / RECORD) if (d / RECORD).is_file() else {}
    return Adapter(
        path=d,
        weights_sha256=sha256_file(weights),
        base_fingerprint=record.get("base_model", {}).get("revision"),
        base_spec=record.get("base_model", {}).get("spec"),
        parents=tuple(record.get("parents", [])),
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


def write_record(adapter_path: Path, model: ResolvedModel, parents: list[Adapter]) -> None:
    """Called by training after PEFT's save_pretrained, so the record describes the weights."""
    write_json(
        adapter_path / RECORD,
        {
            "schema_version": 1,
            "base_model": model.to_dict(),
            "parents": [p.weights_sha256 for p in parents],
            "parent_paths": [str(p.path) for p in parents],
            "weights_sha256": sha256_file(adapter_path / WEIGHTS),
        },
    )


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
