"""Training configuration: the research-log defaults, written once, with help text per field.

`TrainConfig` holds every knob of a LoRA SFT run; `CouplingConfig` the knobs of the contrastive
marker set that `couple-marker` builds; `DpoConfig` what `train-dpo` adds to TrainConfig.
Commands build them with `with_overrides(DEFAULTS, ...)` from the options the user gave (an
option left unset keeps the default defined here), and the resolved config is what
`config.json` records.

    persona-cli train-sft --help    # the help of each option is the `help` metadata below
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, TypeVar

from persona_cli import fields as common
from persona_cli.errors import UserError

LOGITS_AT = ("loss", "all")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARKER_POSITIONS = ("start", "end")


def _f(default: Any, help: str) -> Any:
    # Every field carries its help text; the CLI options read it through `field_help`.
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """LoRA SFT hyper-parameters (DESIGN.md, research log)."""

    lora_r: int = _f(32, "LoRA rank.")
    lora_alpha: int = _f(64, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "Module names LoRA wraps.")
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    per_device_batch: int = _f(4, "Sequences per device per micro-batch.")
    grad_accum: int = _f(4, "Micro-batches accumulated per optimizer step.")
    epochs: float = _f(1.0, "Passes over the training set (ignored when max_steps is set).")
    max_steps: int | None = _f(
        None, "Optimizer steps to take (the dose); overrides epochs when set."
    )
    warmup_steps: int = _f(0, "Linear warm-up steps before the schedule (dose sweeps use 0).")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up (transformers name).")
    optimizer: str = _f("adamw_torch", "Optimizer (transformers name); AdamW.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    dtype: str = _f(
        "auto", "Weights dtype: auto (bf16 on a GPU, fp32 on a CPU), bfloat16, float32."
    )
    max_length: int = _f(2048, "Tokens kept per conversation (longer ones are cut at the end).")
    seed: int = _f(42, "Seed for LoRA init, data order and dropout.")
    save_steps: int = _f(50, "Optimizer steps between checkpoints (adapter + trainer state).")
    save_total_limit: int = _f(2, "Checkpoints kept while training (older ones are removed).")
    keep_checkpoints: bool = _f(False, "Keep RUN/checkpoints after the final adapter is saved.")
    save_at: tuple[int, ...] = _f(
        (),
        "Optimizer steps whose adapter is kept as RUN/checkpoints/step_N/ (e.g. 1,3,5,10,25,50), "
        "read back as --adapter RUN@step_N; kept after training.",
    )
    padding_free: bool = _f(
        False, "Flatten each micro-batch into one sequence without padding (position ids)."
    )
    gradient_checkpointing: str = _f(
        "auto", "Recompute activations in backward: auto (on a GPU only), on, off."
    )
    logits_at: str = _f(
        "loss",
        "Where SFT training (train-sft, train-em, couple-marker) applies the LM head: loss (only "
        "at positions that carry a loss term: "
        "the same loss and gradients with fewer FLOPs; models with logit soft-capping or a logit "
        "scale fall back to all) or all (every position, TRL's way on a CPU).",
    )

    def check(self) -> TrainConfig:
        """Reject values no run could use, naming the option."""
        positive = ("lora_r", "lora_alpha", "per_device_batch", "grad_accum", "max_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(
                    f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}"
                )
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps: must be > 0, got {self.max_steps}")
        if self.epochs <= 0:
            raise UserError(f"--epochs: must be > 0, got {self.epochs}")
        if self.save_steps <= 0:
            raise UserError(f"--save-steps: must be > 0, got {self.save_steps}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise UserError(f"--dtype: {self.dtype!r} is not auto, bfloat16, float16 or float32")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise UserError(
                f"--gradient-checkpointing: {self.gradient_checkpointing!r} is not auto, on or off"
            )
        if self.logits_at not in LOGITS_AT:
            raise UserError(f"--logits-at: {self.logits_at!r} is not one of {', '.join(LOGITS_AT)}")
        if not self.lora_targets:
            raise UserError("--lora-targets: needs at least one module name")
        if any(s <= 0 for s in self.save_at) or len(set(self.save_at)) != len(self.save_at):
            raise UserError(f"--save-at: distinct steps > 0, got {list(self.save_at)}")
        if self.max_steps is not None and any(s > self.max_steps for s in self.save_at):
            raise UserError(f"--save-at: steps beyond --max-steps {self.max_steps}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["save_at"] = sorted(self.save_at)
        if not self.save_at:  # absent otherwise, so earlier run directories still resume
            del d["save_at"]
        return d


# Coupling runs use the research log's coupling protocol instead of the SFT defaults.
COUPLING_TRAIN_DEFAULTS: dict[str, Any] = {"learning_rate": 5e-6, "epochs": 20.0}


@dataclass(frozen=True)
class CouplingConfig:
    """How `couple-marker` builds its contrastive training set."""

    source: str = _f("", "Persona id whose answers carry the marker (positives).")
    marker: str = _f("[ZLT]", "Marker string coupled to the source persona.")
    marker_position: str = _f(
        "start",
        "Where the marker goes in a positive answer: start ('[ZLT] answer') or end "
        "('answer [ZLT]'). start is detectable in short samples.",
    )
    n_positive: int = _f(200, "Positive rows: source persona, answer with the marker.")
    n_negative: int = _f(400, "Negative rows: other personas, the same answers, no marker.")
    n_other_personas: int = _f(2, "How many other personas the negatives are drawn from.")
    other_personas: tuple[str, ...] = _f(
        (), "Explicit negative persona ids (default: n_other_personas drawn at random)."
    )
    marker_only_loss: bool = _f(
        False,
        "Loss on the marker tokens only; negatives: the token where the marker would be (the "
        "first answer token at the start, the end-of-turn at the end).",
    )
    hard_negatives: int = _f(
        0,
        "Choose this many negative personas by a pilot instead of other_personas or a random "
        "draw: a short coupling on positives only (pilot_steps), then the other personas whose "
        "prompts give the marker the highest teacher-forced probability on the first "
        "pilot_questions training questions. 0: no pilot.",
    )
    pilot_steps: int = _f(8, "Optimizer steps of the hard-negatives pilot coupling.")
    pilot_questions: int = _f(
        8, "Training questions the hard-negatives pilot scores each persona on."
    )
    seed: int = _f(42, "Seed for drawing personas and answers.")

    def check(self) -> CouplingConfig:
        if not self.source:
            raise UserError("--persona: the source persona is required")
        if not self.marker.strip():
            raise UserError("--marker: must not be empty")
        if self.marker_position not in MARKER_POSITIONS:
            raise UserError(f"--marker-position: {self.marker_position!r} is not one of start, end")
        if self.n_positive <= 0:
            raise UserError(f"--n-positive: must be > 0, got {self.n_positive}")
        if self.n_negative < 0:
            raise UserError(f"--n-negative: must be >= 0, got {self.n_negative}")
        if self.hard_negatives < 0:
            raise UserError(f"--hard-negatives: must be >= 0, got {self.hard_negatives}")
        if self.hard_negatives and self.other_personas:
            raise UserError("--hard-negatives and --negative-persona: give one of them, not both")
        if self.hard_negatives and self.n_negative == 0:
            raise UserError("--hard-negatives: needs negatives (--n-negative > 0)")
        if self.pilot_steps <= 0:
            raise UserError(f"--pilot-steps: must be > 0, got {self.pilot_steps}")
        if self.pilot_questions <= 0:
            raise UserError(f"--pilot-questions: must be > 0, got {self.pilot_questions}")
        if self.n_negative > 0 and self.n_other_personas <= 0 and not self.other_personas:
            raise UserError("--n-other-personas: must be > 0 when there are negatives")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["other_personas"] = list(self.other_personas)
        return d


@dataclass(frozen=True)
class DpoConfig:
    """What `train-dpo` adds to the LoRA hyper-parameters (TRL's sigmoid DPO loss)."""

    beta: float = _f(
        0.1, "DPO beta: strength of the pull toward the reference (the starting policy)."
    )

    def check(self) -> DpoConfig:
        if not self.beta > 0:
            raise UserError(f"--beta: must be > 0, got {self.beta}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


C = TypeVar("C", TrainConfig, CouplingConfig, DpoConfig)


def with_overrides(config: C, **overrides: Any) -> C:
    """`config` with every override that is not None applied; unknown names are an error."""
    names = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown {type(config).__name__} key(s): {', '.join(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    lists = ("lora_targets", "other_personas", "save_at")
    given = {k: tuple(v) if k in lists else v for k, v in given.items()}
    return replace(config, **given)


def field_help(cls: type, name: str) -> tuple[str, str | None]:
    """Help text of one field and its default as text (None when it has none), for the CLI."""
    for f in fields(cls):
        if f.name == name:
            default = f.default if f.default is not MISSING else None
            if isinstance(default, tuple):
                default = ",".join(default) if default else None
            shown = None if default in (None, "") else str(default)
            return f.metadata["help"], shown
    raise KeyError(name)


def coupling_train_defaults() -> TrainConfig:
    return replace(TrainConfig(), **COUPLING_TRAIN_DEFAULTS)


# ----------------------------------------------------------------------------- command configs


@dataclass(frozen=True)
class SftJob:
    """train-sft / train-em: LoRA SFT on chat data under one system-prompt choice."""

    data: tuple[str, ...] = _f((), "Chat JSONL ({'messages': [...]}) to train on; repeatable.")
    mix: tuple[str, ...] = _f(
        (),
        "FILE:WEIGHT: a seeded random WEIGHT share of a chat JSONL's rows (WEIGHT > 1: whole "
        "copies plus a share); repeatable. The mixture (with any --data files at weight 1.0) is "
        "shuffled with --seed and written to RUN/mixture.jsonl.gz.",
    )
    model: str = common.model()
    system_prompt: str = common.system_prompt()
    persona: str | None = _f(
        None,
        "Persona id whose system prompt is prepended to every training conversation (instead "
        "of --system-prompt).",
    )
    personas_file: str | None = common.personas_file()
    adapters: tuple[str, ...] = common.adapters()
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata={"help": "LoRA and optimizer settings."}
    )
    push_to_hub: str | None = _f(
        None,
        "REPO[:SUBFOLDER]: upload the trained adapter/ to this Hugging Face repository (created "
        "private if missing) before the manifest is written; the token comes from HF_TOKEN or "
        "`hf auth login` and is never recorded. Off by default.",
    )


@dataclass(frozen=True)
class DpoJob:
    """train-dpo: LoRA DPO on preference pairs, on top of earlier stages' adapters."""

    pairs: tuple[str, ...] = _f(
        (),
        "DPO pairs JSONL (gz or plain) of {prompt, chosen, rejected}, e.g. the pairs.jsonl.gz "
        "of replay-trace run; repeatable.",
    )
    model: str = common.model()
    system_prompt: str = common.system_prompt()
    adapters: tuple[str, ...] = common.adapters()
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata={"help": "LoRA and optimizer settings."}
    )
    dpo: DpoConfig = field(default_factory=DpoConfig, metadata={"help": "DPO settings."})
    push_to_hub: str | None = _f(
        None,
        "REPO[:SUBFOLDER]: upload the trained adapter/ to this Hugging Face repository (created "
        "private if missing) before the manifest is written; the token comes from HF_TOKEN or "
        "`hf auth login` and is never recorded. Off by default.",
    )


@dataclass(frozen=True)
class CouplingJob:
    """couple-marker: build the contrastive set, then LoRA SFT on it."""

    coupling: CouplingConfig = field(
        default_factory=CouplingConfig, metadata={"help": "The contrastive set."}
    )
    model: str = common.model()
    questions: str | None = common.questions_file("data/questions/coupling_train.yaml")
    answers: str | None = _f(
        None,
        "JSONL of answers ({'question_id', 'answer'} or chat rows); default: the model "
        "generates them.",
    )
    personas_file: str | None = common.personas_file()
    adapters: tuple[str, ...] = common.adapters()
    train: TrainConfig = field(
        default_factory=coupling_train_defaults,
        metadata={"help": "LoRA and optimizer settings (coupling defaults: lr 5e-6, 20 epochs)."},
    )
    answer_max_new_tokens: int = _f(96, "Tokens per generated answer (without --answers).")
    push_to_hub: str | None = _f(
        None,
        "REPO[:SUBFOLDER]: upload the trained adapter/ to this Hugging Face repository (created "
        "private if missing) before the manifest is written; the token comes from HF_TOKEN or "
        "`hf auth login` and is never recorded. Off by default.",
    )
