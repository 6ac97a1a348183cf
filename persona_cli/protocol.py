"""The protocol record: what defines how a run was produced, written once per run.

The research log's retraction: one condition trained on 8 GPUs (effective batch 128, 47 optimizer
steps) was compared with conditions trained on 1 GPU (batch 16, 375 steps).

Every command passes one `RunProtocol` to `RunDir.finish`, built only by the helpers below
(`training_protocol`, `generation_protocol`, `judge_protocol`, ...; combine them with `|`). Its
`fields` are guarded: each key is one of `GUARDED_FIELDS`, so a field a command records is guarded
by construction (`OPTIONAL_FIELDS`, steering, ablation and the v_hack a projected RL update
uses, are recorded only by runs that used them). Its `details` are recorded beside them and
never compared (vLLM engine settings, completion counts, the OOM retry). `REQUIRED_FIELDS`
lists per command the fields its manifest must yield; `RunDir.finish` refuses to write a
manifest without them, so a command that stops recording one fails in every test that runs it.
The manifest holds the fields at the top of `protocol` and the details under `protocol.details`
(manifest schema 2).

`recorded_fields(manifest)` is the one place a manifest's fields are read: schema 2 directly,
schema 1 (the first release: sampling settings nested under `protocol.generation`, guarded and
other keys mixed, marker and LoRA settings only in config.json) through `_schema1_fields`. The
question set, chat template and system prompt are read from the manifest's inputs and
chat-template record for both. The guard that compares runs is `persona_cli.guard`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from persona_cli.artifacts import read_json, sha256_json
from persona_cli.errors import InputError
from persona_cli.manifest import BatchProtocol
from persona_cli.schemas import CONFIG, MANIFEST

# Field -> what it means; the order is the order they are reported in.
GUARDED_FIELDS: dict[str, str] = {
    # training (train-*, couple-marker, probe replay / extract-vhack batches)
    "world_size": "number of processes (training) or tensor-parallel devices (vLLM)",
    "effective_batch": "per-device batch x accumulation x world size",
    "optimizer_steps": "optimizer steps taken",
    "learning_rate": "peak learning rate",
    "per_device_batch": "sequences per device per micro-step",
    "grad_accum": "gradient accumulation steps",
    "lr_scheduler": "learning-rate schedule after warm-up",
    "warmup_steps": "linear warm-up steps",
    "adapter_kind": "trained adapter: lora or svd (SVD-delta)",
    "lora_r": "adapter rank",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_targets": "modules the adapter wraps",
    "schedule": "the adapter's place in its LR schedule: per-run (a run's final adapter: its "
    "schedule ended there) or one-run (a --save-at checkpoint part-way through a longer run's "
    "one schedule, as dose-sweep --schedule one-run uses)",
    # generation (eval-markers, probe teacher-pool, GRPO/SDPO rollouts)
    "backend": "generation or scoring backend (hf, vllm)",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling threshold",
    "max_new_tokens": "generation length cap",
    "samples_per_prompt": "samples drawn per prompt",
    # markers (eval-markers counts, couple-marker trains)
    "marker": "marker string",
    "marker_case_sensitive": "marker match is case-sensitive",
    "marker_position": "where the coupling puts the marker (start, end)",
    "marker_only_loss": "coupling loss on the marker tokens only",
    # judge (judge-align)
    "judge_backend": "judge API kind (openai, anthropic, local)",
    "judge_model": "LLM judge model",
    "judge_prompt_sha256": "hash of the judge prompts and judge system prompt",
    "judge_scoring": "judge scoring mode (logprobs, parsed)",
    "judge_min_number_mass": "number-token mass below which a reading is unscored",
    # capability (eval-capability)
    "item_set_sha256": "hash of the multiple-choice items",
    "capability_scorer": "how an item is scored",
    "capability_prompt_sha256": "prompt format (hf: layout + instruction; lm-eval: task configs)",
    # methods
    "dpo_beta": "DPO beta",
    "rl_reward": "RL reward function",
    "rl_kl_beta": "GRPO KL coefficient",
    "rl_loss_type": "GRPO loss normalisation",
    "rl_scale_rewards": "GRPO advantage scaling",
    "rl_num_iterations": "GRPO updates per generation batch",
    "grpo_weight": "weight of the GRPO term",
    "sdpo_weight": "weight of the self-distillation term",
    "vhack_loss": "loss v_hack is extracted with (nll, contrastive)",
    "replay_loss": "loss the probe replay differentiates",
    "projection": "v_hack projection of the replay or training update (off, positive, always)",
    "projection_vhack_sha256": "hash of the v_hack the training update is projected against",
    "projection_modules": "module globs the training projection acts on (empty: all)",
    "rl_generators": "mixed-policy generators of the GRPO groups: model, adapter stack, share",
    "dpo_weight": "weight of the trace-replay DPO term in the RL objective",
    "trace_quorum": "teachers needed for a consensus",
    "trace_answerers_sha256": "hash of the student and teacher specs",
    "geometry_method": "persona-vector centroid method(s): prompt-last, response-mean or both",
    "geometry_layers": "hidden-state layers the persona vectors are taken at (0 = embeddings)",
    "steering": "vectors added to the residual stream while generating (file sha256, layer, "
    "coef, positions); absent: none",
    "ablation": "vector directions projected out of the residual stream while generating (file "
    "sha256, layer); absent: none",
    # read from the manifest's inputs and chat-template record, not from the record
    "question_set_sha256": "hash of the question file",
    "chat_template_sha256": "hash of the chat template",
    "system_prompt": "system-prompt choice (mode and text)",
}
DERIVED_FIELDS = ("question_set_sha256", "chat_template_sha256", "system_prompt")
# Guarded fields a run records only when it used them: absent means none (so runs made before
# they existed compare with runs that do not use them). No command requires them.
OPTIONAL_FIELDS = frozenset(
    {"steering", "ablation", "projection_vhack_sha256", "projection_modules"}
)

_TRAINING = frozenset(
    {
        "world_size",
        "effective_batch",
        "optimizer_steps",
        "learning_rate",
        "per_device_batch",
        "grad_accum",
        "lr_scheduler",
        "warmup_steps",
        "adapter_kind",
        "lora_r",
        "lora_alpha",
        "lora_targets",
        "chat_template_sha256",
        "system_prompt",
    }
)
_SAMPLING = frozenset({"temperature", "top_p", "max_new_tokens", "samples_per_prompt"})
_GENERATION = _SAMPLING | {"backend", "world_size", "chat_template_sha256", "system_prompt"}
_RL = frozenset(
    {
        "rl_reward",
        "rl_kl_beta",
        "rl_loss_type",
        "rl_scale_rewards",
        "rl_num_iterations",
        "grpo_weight",
        "sdpo_weight",
        "projection",
        "rl_generators",
        "dpo_weight",
    }
)
_PROBE_BATCH = frozenset(
    {
        "world_size",
        "effective_batch",
        "optimizer_steps",
        "per_device_batch",
        "grad_accum",
        "adapter_kind",
        "lora_r",
        "lora_alpha",
        "lora_targets",
        "chat_template_sha256",
    }
)

_SFT = _TRAINING | {"schedule"}  # the LoRA trainers that can keep --save-at checkpoints

# Command -> the guarded fields its manifest must yield (checked by RunDir.finish).
REQUIRED_FIELDS: dict[str, frozenset[str]] = {
    "train-sft": _SFT,
    "train-em": _SFT,
    "couple-marker": _SFT | {"marker", "marker_position", "marker_only_loss"},
    "train-dpo": _SFT | {"dpo_beta"},
    "train-grpo": _TRAINING | _SAMPLING | _RL,
    "train-sdpo": _TRAINING | _SAMPLING | _RL,
    "eval-markers": _GENERATION | {"marker", "marker_case_sensitive", "question_set_sha256"},
    "judge-align": frozenset(
        {
            "judge_backend",
            "judge_model",
            "judge_prompt_sha256",
            "judge_scoring",
            "judge_min_number_mass",
        }
    ),
    "eval-capability": frozenset(
        {
            "backend",
            "item_set_sha256",
            "capability_scorer",
            "capability_prompt_sha256",
            "chat_template_sha256",
            "system_prompt",
        }
    ),
    "probe teacher-pool": _GENERATION,
    "extract-vhack": _PROBE_BATCH | {"vhack_loss"},
    "probe replay": _PROBE_BATCH | {"learning_rate", "replay_loss", "projection"},
    "replay-trace run": frozenset({"trace_quorum", "trace_answerers_sha256"}),
    "persona-vectors extract": frozenset(
        {"geometry_method", "geometry_layers", "question_set_sha256", "chat_template_sha256"}
    ),
    "persona-vectors shift": frozenset({"geometry_method", "geometry_layers"}),
    "persona-vectors trait": frozenset({"geometry_method", "geometry_layers"}),
    "persona-vectors project": frozenset(
        {"geometry_method", "geometry_layers", "max_new_tokens", "chat_template_sha256"}
    ),
}


@dataclass(frozen=True)
class RunProtocol:
    """What defines how a run was produced: guarded `fields`, recorded-only `details`."""

    fields: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.fields) - set(GUARDED_FIELDS))
        if unknown:
            raise ValueError(f"not guarded fields (add them to GUARDED_FIELDS): {unknown}")
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def __or__(self, other: RunProtocol) -> RunProtocol:
        shared = set(self.fields) & set(other.fields)
        clash = [k for k in shared if self.fields[k] != other.fields[k]]
        if clash:
            raise ValueError(f"protocol parts disagree on {sorted(clash)}")
        return RunProtocol({**self.fields, **other.fields}, {**self.details, **other.details})

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `protocol`: the guarded fields, and the details under `details`."""
        return {**dict(sorted(self.fields.items())), "details": dict(self.details)}


def batch_protocol(batch: BatchProtocol) -> RunProtocol:
    """Per-device batch, accumulation, world size, effective batch and optimizer steps."""
    return RunProtocol(batch.to_dict())


def training_protocol(batch: BatchProtocol, learning_rate: float, **fields: Any) -> RunProtocol:
    """Batch, steps and learning rate; `fields`: lr_scheduler, warmup_steps and such."""
    return batch_protocol(batch) | RunProtocol({"learning_rate": learning_rate, **fields})


SCHEDULES = ("per-run", "one-run")


def schedule_protocol(schedule: str) -> RunProtocol:
    """`schedule`: per-run for a run's own (final) adapter; a checkpoint adapter read through
    `RUN@step_N` is one-run (`persona_cli.guard.protocol_of` sets it)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
    return RunProtocol({"schedule": schedule})


def adapter_protocol(
    *, kind: str, rank: int, alpha: float | None, targets: Iterable[str]
) -> RunProtocol:
    return RunProtocol(
        {"adapter_kind": kind, "lora_r": rank, "lora_alpha": alpha, "lora_targets": list(targets)}
    )


def generation_protocol(
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    samples_per_prompt: int,
    backend: str | None = None,
    world_size: int | None = None,
) -> RunProtocol:
    fields: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "samples_per_prompt": samples_per_prompt,
    }
    if backend is not None:
        fields["backend"] = backend
    if world_size is not None:
        fields["world_size"] = world_size
    return RunProtocol(fields)


def sampling_of(generation: Any, *, backend: str, world_size: int) -> RunProtocol:
    """`generation_protocol` of a `GenerationConfig` (n is the samples per prompt)."""
    return generation_protocol(
        temperature=generation.temperature,
        top_p=generation.top_p,
        max_new_tokens=generation.max_new_tokens,
        samples_per_prompt=generation.n,
        backend=backend,
        world_size=world_size,
    )


def marker_protocol(marker: str, case_sensitive: bool) -> RunProtocol:
    return RunProtocol({"marker": marker, "marker_case_sensitive": case_sensitive})


def coupling_protocol(marker: str, position: str, marker_only_loss: bool) -> RunProtocol:
    return RunProtocol(
        {"marker": marker, "marker_position": position, "marker_only_loss": marker_only_loss}
    )


def judge_protocol(
    *,
    judge_model: str,
    judge_prompt_sha256: str,
    judge_backend: str | None = None,
    judge_scoring: str | None = None,
    judge_min_number_mass: float | None = None,
) -> RunProtocol:
    fields = {"judge_model": judge_model, "judge_prompt_sha256": judge_prompt_sha256}
    optional = {
        "judge_backend": judge_backend,
        "judge_scoring": judge_scoring,
        "judge_min_number_mass": judge_min_number_mass,
    }
    return RunProtocol({**fields, **{k: v for k, v in optional.items() if v is not None}})


def method_protocol(**fields: Any) -> RunProtocol:
    """Method fields (dpo_beta, rl_*, vhack_loss, projection, trace_*, capability_*, ...)."""
    return RunProtocol(fields)


def intervention_protocol(fields: Mapping[str, Any]) -> RunProtocol:
    """`steering` / `ablation` (`persona_cli.geometry.steer.records`); absent when none."""
    return RunProtocol(fields)


def details(**values: Any) -> RunProtocol:
    """Recorded beside the protocol, never compared."""
    return RunProtocol(details=values)


def required_fields(command: str) -> frozenset[str]:
    return REQUIRED_FIELDS.get(command, frozenset())


# ----------------------------------------------------------------------------- reading


def recorded_fields(
    manifest: Mapping[str, Any], source: str | Path, config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The guarded fields a manifest records (`source` names it in errors). Schema 1 needs the
    run's config.json (`config`) for the fields that release kept only there."""
    version = manifest.get("schema_version")
    protocol = manifest["protocol"]
    if version == 1:
        fields = _schema1_fields(manifest, config)
    elif version == 2:
        fields = {k: v for k, v in protocol.items() if k != "details"}
        unknown = sorted(set(fields) - set(GUARDED_FIELDS))
        if unknown:
            raise InputError(source, f"protocol field(s) {unknown} are not guarded fields")
    else:
        raise InputError(source, f"manifest schema_version {version!r}: this release reads 1, 2")
    questions = manifest["inputs"].get("questions")
    if questions is not None:
        fields["question_set_sha256"] = questions["sha256"]
    template = manifest["chat_template"]
    if template is not None:
        fields["chat_template_sha256"] = template["template_sha256"]
        if "system_prompt" in template:
            fields["system_prompt"] = template["system_prompt"]
    return fields


def run_fields(run: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`recorded_fields` of the run directory `run`: its manifest (read unless given) and, for
    schema 1, its config.json; `schedule` per-run for a training run that records none."""
    if manifest is None:
        manifest = read_json(run / MANIFEST)
    config = read_json(run / CONFIG) if (run / CONFIG).is_file() else None
    fields = recorded_fields(manifest, run / MANIFEST, config)
    if "optimizer_steps" in fields and "schedule" not in fields:
        # A run that trained but records no `schedule` (written before it existed, or by a
        # trainer without --save-at): its adapter is its own schedule's end. Filled here, for
        # comparisons, and not in `recorded_fields`, so RunDir.finish still requires it.
        fields["schedule"] = "per-run"
    return fields


# Schema-1 protocol keys -> field names (per command where a key meant different things).
_SCHEMA1_RENAMES = {
    "num_generations": "samples_per_prompt",
    "max_completion_length": "max_new_tokens",
}
_SCHEMA1_RL = {
    "reward": "rl_reward",
    "beta": "rl_kl_beta",
    "loss_type": "rl_loss_type",
    "scale_rewards": "rl_scale_rewards",
    "num_iterations": "rl_num_iterations",
}


def _schema1_fields(
    manifest: Mapping[str, Any], config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The first release's manifests: flat protocol keys, sampling under `generation`, the
    marker, LoRA and judge settings only in config.json (read when `config` is given). What it
    never recorded stays absent, so comparing such a run with a newer one on that field is
    refused, not waved through."""
    command, protocol = manifest["command"], manifest["protocol"]
    fields: dict[str, Any] = {}
    renames = dict(_SCHEMA1_RENAMES)
    if command in ("train-grpo", "train-sdpo"):
        renames.update(_SCHEMA1_RL)
    if command == "train-dpo":
        renames["beta"] = "dpo_beta"
    for key, value in protocol.items():
        name = renames.get(key, key)
        if name in GUARDED_FIELDS:
            fields[name] = value
    generation = protocol.get("generation")
    if generation is not None:
        fields.update(
            {
                "temperature": generation["temperature"],
                "top_p": generation["top_p"],
                "max_new_tokens": generation["max_new_tokens"],
                "samples_per_prompt": generation["n"],
            }
        )
    if config is not None:
        fields.update(_schema1_config_fields(command, config["config"]))
    return fields


def _schema1_config_fields(command: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Schema-1 fields that only the run's config.json holds."""
    fields: dict[str, Any] = {}
    train = cfg.get("train")
    if train is not None:
        fields.update(
            adapter_protocol(
                kind="lora",
                rank=train["lora_r"],
                alpha=train["lora_alpha"],
                targets=train["lora_targets"],
            ).fields
        )
    if command == "eval-markers":
        fields.update(marker_protocol(cfg["marker"], cfg["case_sensitive"]).fields)
    coupling = cfg.get("coupling")
    if command == "couple-marker" and coupling is not None:
        fields.update(
            coupling_protocol(
                coupling["marker"], coupling["marker_position"], coupling["marker_only_loss"]
            ).fields
        )
    if command == "judge-align":
        scoring = cfg["scoring"] or ("parsed" if cfg["backend"] == "anthropic" else "logprobs")
        fields.update(
            {
                "judge_backend": cfg["backend"],
                "judge_scoring": scoring,
                "judge_min_number_mass": cfg["min_number_mass"],
            }
        )
    if command == "replay-trace run":
        fields["trace_quorum"] = cfg["quorum"]
        fields["trace_answerers_sha256"] = answerers_sha256(cfg["student"], cfg["teachers"])
    if command in ("extract-vhack", "probe replay"):
        loss_field = "vhack_loss" if command == "extract-vhack" else "replay_loss"
        fields[loss_field] = cfg["loss"]
        if command == "probe replay":
            fields["projection"] = cfg["project_when"] if cfg["projected"] else "off"
        adapter = cfg.get("adapter")
        if adapter is not None:
            kind, alpha = adapter["kind"], adapter["alpha"]
            record = adapter_protocol(
                kind=kind,
                rank=adapter["rank"],
                alpha=alpha if kind == "lora" else None,
                targets=adapter["targets"],
            )
            fields.update(record.fields)
    return fields


def answerers_sha256(student: dict[str, Any], teachers: list[dict[str, Any]]) -> str:
    """`trace_answerers_sha256`: the student and teacher specs of a replay-trace run."""
    return sha256_json({"student": student, "teachers": teachers})
