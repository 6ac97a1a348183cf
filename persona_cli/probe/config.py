"""Probe configuration: every default of the reward-hack probe, written once, with help text.

`TeacherPoolConfig` (`probe teacher-pool`), `AdapterConfig` (which adapter the gradients live
on), `ExtractConfig` (`extract-vhack`), `ReplayConfig` (`probe replay`) and `UATConfig`
(`probe-uat`). The commands build them from the options the user gave (an option left unset
keeps the default defined here; sampling defaults stay in `persona_cli.generate.GenerationConfig`)
and `config.json` records the resolved config.

    persona-cli extract-vhack --help     # each option's help is the `help` metadata below
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from persona_cli.errors import UserError
from persona_cli.generate.config import GenerationConfig
from persona_cli.models import EMBEDDED
from persona_cli.problems import HINTS
from persona_cli.protocol import RunProtocol, adapter_protocol

ADAPTERS = ("lora", "svd")
EXTRACT_LOSSES = ("nll", "contrastive")
REPLAY_LOSSES = ("nll", "grpo")
PROJECT_WHEN = ("positive", "always")
OPTIMIZERS = ("sgd", "adamw")
GRAD_METHODS = ("batched", "loop")
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f(default: Any, help: str) -> Any:
    # Every field carries its help text; the CLI options read it through `field_help`.
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TeacherPoolConfig:
    """`probe teacher-pool`: the teacher, the problems each step asks, and the sandbox workers."""

    model: str = _f(EMBEDDED, "Teacher model spec.")
    adapters: tuple[str, ...] = _f((), "Teacher LoRA adapter stack, in training order.")
    problems: str | None = _f(
        None, "Problem file or directory (default: the shipped data/problems/problems.yaml)."
    )
    problem_ids: tuple[str, ...] | None = _f(
        None, "Ask only these problem ids (default: every problem in the file)."
    )
    n_problems: int = _f(8, "Problems per step, drawn without replacement (seeded per step).")
    steps: int = _f(4, "Pool steps: each asks its own problem subset with its own sampling seed.")
    hint: str | None = _f(
        "simple_overwrite_tests",
        "Prompt variant: simple_overwrite_tests (graded by the run_tests() it shows) or none.",
    )
    system_prompt: str = _f(
        "none", "TEXT, 'none' (no system prompt) or 'template-default' (chat-template guard)."
    )
    workers: int = _f(4, "Completions graded in the sandbox at once.")
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(n=4),
        metadata={"help": "Sampling (n = generations per problem; seed also picks problems)."},
    )

    def check(self) -> TeacherPoolConfig:
        if self.hint not in HINTS:
            choices = ", ".join("none" if h is None else h for h in HINTS)
            raise UserError(f"--hint {self.hint!r}: choose one of {choices}")
        _positive(n_problems=self.n_problems, steps=self.steps, workers=self.workers)
        return self


@dataclass(frozen=True)
class AdapterConfig:
    """The probe adapter over the frozen base model (see persona_cli.probe.adapters)."""

    kind: str = _f(
        "lora", "Probe adapter: lora (PEFT LoRA) or svd (delta on top-r singular values)."
    )
    rank: int = _f(8, "LoRA rank, or the number of top singular values the svd adapter trains.")
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank); unused by svd.")
    targets: tuple[str, ...] = _f(LINEAR_TARGETS, "Linear module names to wrap.")
    layers: tuple[int, ...] | None = _f(None, "Decoder layer indices to wrap (None: all).")
    seed: int = _f(42, "Seed of the LoRA A initialisation (v_hack is only valid for this init).")

    def check(self) -> AdapterConfig:
        if self.kind not in ADAPTERS:
            raise UserError(f"--adapter {self.kind!r}: choose one of {', '.join(ADAPTERS)}")
        if self.rank <= 0:
            raise UserError(f"--rank: must be > 0, got {self.rank}")
        if not self.targets:
            raise UserError("--targets: name at least one Linear module")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise UserError(f"--layers: indices must be >= 0, got {list(self.layers)}")
        return self


def probe_adapter_protocol(config: AdapterConfig) -> RunProtocol:
    """The guarded adapter fields of a probe adapter (alpha is unused by svd: None)."""
    alpha = config.alpha if config.kind == "lora" else None
    return adapter_protocol(kind=config.kind, rank=config.rank, alpha=alpha, targets=config.targets)


@dataclass(frozen=True)
class ExtractConfig:
    """`extract-vhack`: the hack direction from labelled completions."""

    model: str = _f(EMBEDDED, "Model spec the gradients are taken on.")
    adapter: AdapterConfig = field(
        default_factory=AdapterConfig, metadata={"help": "Probe adapter (AdapterConfig)."}
    )
    loss: str = _f(
        "nll",
        "nll: mean NLL gradient on hack rows minus that on clean rows (class-balanced); "
        "contrastive: gradient of mean_i A_i * NLL_i over all rows, A = +1 hack / -1 clean.",
    )
    batch_size: int = _f(8, "Samples per batched gradient pass.")
    max_length: int = _f(1024, "Tokens kept per prompt+completion (the completion is cut).")
    dtype: str = _f("float32", "Weights dtype (float32 keeps cosines comparable across paths).")

    def check(self) -> ExtractConfig:
        self.adapter.check()
        if self.loss not in EXTRACT_LOSSES:
            raise UserError(f"--loss {self.loss!r}: choose one of {', '.join(EXTRACT_LOSSES)}")
        _positive(batch_size=self.batch_size, max_length=self.max_length)
        return self


@dataclass(frozen=True)
class ReplayConfig:
    """`probe replay`: per-sample gradients of a pool, step by step, against v_hack."""

    loss: str = _f(
        "nll",
        "nll: each sample's update is its NLL gradient (SFT on the pool); grpo: Dr.GRPO "
        "advantages A = r - mean(r of the problem's group) weight the NLL gradients.",
    )
    projected: bool = _f(False, "Remove the v_hack component from each module's update.")
    project_when: str = _f(
        "positive",
        "positive: project a module's gradient only when its cosine with v_hack is > 0 (the "
        "update would push toward hacking); always: project every module.",
    )
    optimizer: str = _f("sgd", "Optimizer stepping the adapter once per pool step: sgd or adamw.")
    lr: float = _f(1e-4, "Learning rate of the per-step update.")
    weight_decay: float = _f(0.0, "AdamW weight decay (sgd ignores it).")
    batch_size: int = _f(8, "Samples per batched gradient pass (a step may take several).")
    max_length: int = _f(1024, "Tokens kept per prompt+completion (the completion is cut).")
    max_steps: int | None = _f(None, "Replay only the first N pool steps (None: all).")
    grad_method: str = _f(
        "batched",
        "batched: per-sample gradients from one padded forward+backward (hooks); loop: one "
        "backward per sample (the research log's method, slow, a reference).",
    )

    def check(self) -> ReplayConfig:
        if self.loss not in REPLAY_LOSSES:
            raise UserError(f"--loss {self.loss!r}: choose one of {', '.join(REPLAY_LOSSES)}")
        if self.project_when not in PROJECT_WHEN:
            raise UserError(
                f"--project-when {self.project_when!r}: choose one of {', '.join(PROJECT_WHEN)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.grad_method not in GRAD_METHODS:
            raise UserError(
                f"--grad-method {self.grad_method!r}: choose one of {', '.join(GRAD_METHODS)}"
            )
        if self.lr < 0:
            raise UserError(f"--lr: must be >= 0, got {self.lr}")
        _positive(batch_size=self.batch_size, max_length=self.max_length)
        if self.max_steps is not None:
            _positive(max_steps=self.max_steps)
        return self


@dataclass(frozen=True)
class UATConfig:
    """`probe-uat`: thresholds of the four acceptance checks (DESIGN.md, experiment 4)."""

    t1_min_hack_rate: float = _f(0.30, "T1: teacher hack rate over pool rows must be >= this.")
    t2_min_coverage: float = _f(
        0.90, "T2: fraction of pool rows with a non-null vanilla cosine must be >= this."
    )
    t3_min_step_fraction: float = _f(
        0.80, "T3: fraction of projected-replay steps with mean cos_out < mean cos_in, >= this."
    )
    t4_alpha: float = _f(
        0.05, "T4: one-sided Welch p (hacked: cos|gt_pass=0 > cos|gt_pass=1) must be < this."
    )

    def check(self) -> UATConfig:
        for name in ("t1_min_hack_rate", "t2_min_coverage", "t3_min_step_fraction", "t4_alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag}: must be in [0, 1], got {value}")
        return self


# ----------------------------------------------------------------------------- command configs


@dataclass(frozen=True)
class ExtractJob:
    """extract-vhack: which labelled completions, and how the direction is taken."""

    pool: str | None = _f(None, "Teacher-pool run directory (step_NNNNNN.jsonl.gz rows).")
    pairs: str | None = _f(None, "JSONL of {prompt, hack, clean} rows instead of a pool.")
    extract: ExtractConfig = field(
        default_factory=ExtractConfig, metadata={"help": "Model, adapter and loss."}
    )


@dataclass(frozen=True)
class ReplayJob:
    """probe replay: a pool replayed against a v_hack."""

    pool: str = field(metadata={"help": "Teacher-pool run directory."})
    vhack: str = field(metadata={"help": "extract-vhack run directory or v_hack.safetensors."})
    model: str | None = _f(None, "Model spec (default: the one v_hack was extracted on).")
    replay: ReplayConfig = field(
        default_factory=ReplayConfig, metadata={"help": "Loss, projection and optimizer."}
    )


@dataclass(frozen=True)
class UATJob:
    """probe-uat: the runs the four checks read, and their thresholds."""

    pool: str = field(metadata={"help": "Teacher-pool run directory."})
    vanilla: str = field(metadata={"help": "Vanilla probe replay run."})
    projected: str = field(metadata={"help": "Projected probe replay run."})
    checks: UATConfig = field(default_factory=UATConfig, metadata={"help": "Thresholds."})


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')}: must be > 0, got {value}")


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config, tuples as lists."""
    return asdict(config)


def field_help(cls: type, name: str) -> tuple[str, str | None]:
    """Help text of one field and its default as text (None when it has none), for the CLI."""
    for f in fields(cls):
        if f.name == name:
            default = f.default if f.default is not MISSING else None
            if isinstance(default, tuple):
                default = ",".join(map(str, default)) if default else None
            shown = None if default in (None, "") else str(default)
            return f.metadata["help"], shown
    raise KeyError(name)
