"""The protocol guard: runs that differ in how they were produced are never silently compared.

The research log's retraction: one condition trained on 8 GPUs (effective batch 128, 47 optimizer
steps) was compared with conditions trained on 1 GPU (batch 16, 375 steps). `protocol_of(run)`
collects the fields that define a run's protocol from its manifest and, following the adapter
stack, from the manifests of the training runs that produced its adapters; `check_protocols`
lists every field whose values differ across the runs being compared, so `compare` can refuse
(exit 3) unless the user declares the difference with `--allow-diff FIELD`.

Commands record their protocol in `manifest["protocol"]` with the canonical keys below
(`training_protocol`, `generation_protocol`, `judge_protocol` build them); the question set,
chat template and system prompt are read from the manifest's inputs and chat-template record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_json
from persona_cli.errors import EXIT_PROTOCOL, InputError, UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.rundir import CONFIG, MANIFEST

# Field -> what it means; the order is the order they are reported in.
GUARDED_FIELDS: dict[str, str] = {
    "world_size": "number of training processes",
    "effective_batch": "per-device batch x accumulation x world size",
    "optimizer_steps": "optimizer steps taken",
    "learning_rate": "peak learning rate",
    "per_device_batch": "sequences per device per micro-step",
    "grad_accum": "gradient accumulation steps",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling threshold",
    "max_new_tokens": "generation length cap",
    "samples_per_prompt": "samples drawn per prompt",
    "judge_model": "LLM judge model",
    "judge_prompt_sha256": "hash of the judge prompt",
    "question_set_sha256": "hash of the question file",
    "chat_template_sha256": "hash of the chat template",
    "system_prompt": "system-prompt choice (mode and text)",
}


def training_protocol(batch: BatchProtocol, learning_rate: float) -> dict[str, Any]:
    return {**batch.to_dict(), "learning_rate": learning_rate}


def generation_protocol(
    *, temperature: float, top_p: float, max_new_tokens: int, samples_per_prompt: int
) -> dict[str, Any]:
    return {
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "samples_per_prompt": samples_per_prompt,
    }


def judge_protocol(*, judge_model: str, judge_prompt_sha256: str) -> dict[str, Any]:
    return {"judge_model": judge_model, "judge_prompt_sha256": judge_prompt_sha256}


def _own_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in (manifest.get("protocol") or {}).items() if k in GUARDED_FIELDS}
    questions = (manifest.get("inputs") or {}).get("questions")
    if questions is not None:
        fields["question_set_sha256"] = questions["sha256"]
    template = manifest.get("chat_template")
    if template is not None:
        fields["chat_template_sha256"] = template["template_sha256"]
        fields["system_prompt"] = template["system_prompt"]
    return fields


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


def protocol_of(run: str | Path) -> dict[str, Any]:
    """Flattened protocol of a finished run: its own fields, then `stage[i].FIELD` for the
    training run behind the i-th adapter of its stack (when that run directory still exists)."""
    run = Path(run)
    manifest = read_json(run / MANIFEST)
    fields = _own_fields(manifest)
    for i, adapter in enumerate(manifest.get("adapters") or []):
        source = _training_run_of(adapter["path"])
        if source is None:
            fields[f"stage[{i}].adapter"] = adapter["weights_sha256"]
            continue
        for k, v in _own_fields(read_json(source / MANIFEST)).items():
            fields[f"stage[{i}].{k}"] = v
    return fields


def _field_name(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith("stage[") else key


@dataclass(frozen=True)
class ProtocolDifference:
    field: str
    values: dict[str, list[str]]  # rendered value -> runs holding it

    def describe(self) -> str:
        parts = [f"{value} in {', '.join(runs)}" for value, runs in self.values.items()]
        return f"{self.field}: " + " vs ".join(parts)


def check_protocols(
    runs: dict[str, dict[str, Any]], allow_diff: set[str]
) -> tuple[list[ProtocolDifference], list[ProtocolDifference]]:
    """Compare the protocols of `runs` (label -> protocol). Returns (refused, allowed): the
    differing fields not declared, and those declared with `--allow-diff` (reported anyway)."""
    unknown = allow_diff - set(GUARDED_FIELDS)
    if unknown:
        raise UserError(
            f"--allow-diff {sorted(unknown)[0]!r}: not a guarded field "
            f"(choose from {', '.join(GUARDED_FIELDS)})"
        )
    keys = sorted(
        {k for p in runs.values() for k in p},
        key=lambda k: (
            list(GUARDED_FIELDS).index(_field_name(k))
            if _field_name(k) in GUARDED_FIELDS
            else len(GUARDED_FIELDS),
            k,
        ),
    )
    refused, allowed = [], []
    for key in keys:
        groups: dict[str, list[str]] = {}
        for label, proto in runs.items():
            value = repr(proto[key]) if key in proto else "<absent>"
            groups.setdefault(value, []).append(label)
        if len(groups) > 1:
            diff = ProtocolDifference(key, groups)
            (allowed if _field_name(key) in allow_diff else refused).append(diff)
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
