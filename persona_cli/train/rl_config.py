"""Configuration of train-grpo / train-sdpo: every RL default, written once, with help text.

`RLConfig` holds the GRPO / SDPO knobs, the adapter kind, the projection and the DPO-term
settings; `RLJob` the inputs (data, model, adapter stack, v_hack, generators, DPO pairs). The
LoRA and optimizer knobs are a `persona_cli.train.config.TrainConfig` inside the job.

    persona-cli train-grpo --help     # each option's help is the `help` metadata below
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from persona_cli import fields as common
from persona_cli.errors import UserError
from persona_cli.problems import HINTS
from persona_cli.train.config import TrainConfig
from persona_cli.train.rewards import REWARDS, UNIT_TESTS

ADAPTER_KINDS = ("lora", "svd")
PROJECT_RULES = ("off", "positive", "always")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
# Completion budget per reward when --max-completion-length is not given: a letter, or a function.
COMPLETION_LENGTH_DEFAULTS = {"mc": 8, "unit-tests": 256}
# TrainConfig fields RL runs change: LoRA RL wants ~10x TRL's full-model lr (1e-6); a constant
# schedule; no LoRA dropout, because TRL samples in train mode and the samples must come from
# the policy that is scored.
RL_TRAIN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-5,
    "per_device_batch": 8,
    "grad_accum": 1,
    "lr_scheduler": "constant",
    "lora_dropout": 0.0,
}
# train-sdpo: the distillation term alone.
SDPO_DEFAULTS: dict[str, Any] = {"grpo_weight": 0.0, "sdpo_weight": 1.0}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RLConfig:
    """GRPO / SDPO knobs (the LoRA and optimizer knobs are a `TrainConfig`)."""

    reward: str = _f(
        "mc",
        "mc: the completion starts with the correct option letter; unit-tests: the completion "
        "passes the problem's tests in the sandbox.",
    )
    num_generations: int = _f(
        4, "Completions per prompt (the GRPO group); batch x accumulation x world must divide."
    )
    max_completion_length: int | None = _f(
        None, "Tokens sampled per completion (default: 8 for mc, 256 for unit-tests)."
    )
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0: off).")
    beta: float = _f(0.0, "KL penalty to the starting policy (0: no reference pass).")
    epsilon: float = _f(0.2, "Clipping range of the importance ratio.")
    loss_type: str = _f("dapo", "GRPO loss aggregation (TRL): dapo, grpo, dr_grpo, bnpo.")
    scale_rewards: str = _f(
        "group", "Advantage scaling: group (by the group's std), batch, none (Dr. GRPO)."
    )
    num_iterations: int = _f(1, "Optimizer passes over each generated batch.")
    grpo_weight: float = _f(1.0, "Weight of the GRPO policy loss (train-sdpo: 0).")
    sdpo_weight: float = _f(
        0.0,
        "Weight of the self-distillation term: token KL from the un-hinted pass to the model's "
        "own hinted pass on the same samples.",
    )
    unit_tests: str = _f(
        "hidden",
        "unit-tests reward: hidden (ground-truth tests) or visible (the run_tests() grader, "
        "which a completion can hack).",
    )
    grader_hint: str = _f(
        "none",
        "unit-tests prompt: none, or simple_overwrite_tests (says the answer is graded by "
        "run_tests() and shows it).",
    )
    sandbox_timeout_s: float = _f(10.0, "Wall-clock limit of one sandboxed run (unit-tests).")
    sandbox_workers: int = _f(2, "Sandboxed runs in parallel (unit-tests).")
    adapter_kind: str = _f(
        "lora",
        "Trained adapter: lora (rank --lora-r, alpha --lora-alpha on --lora-targets) or svd (a "
        "delta on the top --lora-r singular values of each target Linear).",
    )
    adapter_init_seed: int | None = _f(
        None, "Seed of the adapter's initialisation (default: v_hack's with --vhack, else --seed)."
    )
    project: str = _f(
        "positive",
        "With --vhack: positive (remove v_hack from a module's update when its cosine is > 0), "
        "always (every module), off (measure and log the cosines only: the vanilla arm).",
    )
    project_modules: tuple[str, ...] = _f(
        (), "Module-name globs the projection acts on (default: every adapter module)."
    )
    dpo_weight: float = _f(
        0.0, "Weight of the DPO term on --dpo-pairs in the objective (the third channel)."
    )
    dpo_beta: float = _f(0.1, "DPO beta of that term (strength of the pull from the start).")
    dpo_batch: int = _f(2, "DPO pairs per micro-batch.")

    def completion_length(self) -> int:
        if self.max_completion_length is not None:
            return self.max_completion_length
        return COMPLETION_LENGTH_DEFAULTS[self.reward]

    def check(self) -> RLConfig:
        if self.reward not in REWARDS:
            raise UserError(f"--reward: {self.reward!r} is not one of {', '.join(REWARDS)}")
        if self.num_generations < 2:
            raise UserError(f"--num-generations: GRPO needs >= 2, got {self.num_generations}")
        if self.max_completion_length is not None and self.max_completion_length <= 0:
            raise UserError(
                f"--max-completion-length: must be > 0, got {self.max_completion_length}"
            )
        if self.temperature <= 0:
            raise UserError(f"--temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.beta < 0 or self.epsilon <= 0:
            raise UserError("--beta must be >= 0 and --epsilon > 0")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(
                f"--loss-type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}"
            )
        if self.scale_rewards not in SCALE_REWARDS:
            raise UserError(
                f"--scale-rewards: {self.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}"
            )
        if self.num_iterations < 1:
            raise UserError(f"--num-iterations: must be >= 1, got {self.num_iterations}")
        if self.grpo_weight < 0 or self.sdpo_weight < 0:
            raise UserError("--sdpo-weight and the GRPO weight must be >= 0")
        if self.grpo_weight == 0 and self.sdpo_weight == 0:
            raise UserError("--sdpo-weight: must be > 0 when the GRPO loss is off (train-sdpo)")
        if self.unit_tests not in UNIT_TESTS:
            raise UserError(f"--unit-tests: {self.unit_tests!r} is not one of hidden, visible")
        if self.grader_hint not in ("none", *(h for h in HINTS if h is not None)):
            raise UserError(
                f"--grader-hint: {self.grader_hint!r} is not one of none, simple_overwrite_tests"
            )
        if self.sandbox_timeout_s <= 0 or self.sandbox_workers < 1:
            raise UserError("--sandbox-timeout must be > 0 and --sandbox-workers >= 1")
        if self.adapter_kind not in ADAPTER_KINDS:
            raise UserError(f"--adapter-kind: {self.adapter_kind!r} is not one of lora, svd")
        if self.project not in PROJECT_RULES:
            raise UserError(f"--project: {self.project!r} is not one of off, positive, always")
        if self.adapter_kind == "svd" and self.beta != 0:
            raise UserError("--beta: the KL reference of an svd adapter is not supported; use 0")
        if self.dpo_weight < 0 or self.dpo_beta <= 0 or self.dpo_batch < 1:
            raise UserError("--dpo-weight must be >= 0, --dpo-beta > 0 and --dpo-batch >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_completion_length": self.completion_length()}


def rl_train_defaults() -> TrainConfig:
    return replace(TrainConfig(), **RL_TRAIN_DEFAULTS)


@dataclass(frozen=True)
class RLJob:
    """train-grpo / train-sdpo: one LoRA adapter trained on sampled, rewarded completions."""

    data: str | None = _f(
        None,
        "mc: MC JSONL in the ARC fields, optional 'hint' per row (default "
        "data/mcq/mini_arc.jsonl); unit-tests: a problem YAML or a directory of them (default "
        "data/problems).",
    )
    model: str = common.model()
    system_prompt: str = common.system_prompt()
    adapters: tuple[str, ...] = common.adapters()
    problem_ids: tuple[str, ...] | None = _f(
        None, "unit-tests: train on these problem ids only (default: every problem in --data)."
    )
    vhack: str | None = _f(
        None,
        "extract-vhack run (or v_hack.safetensors) on this model and adapter: every optimizer "
        "update gets its v_hack component removed per module (--project), and the cosines are "
        "logged per step.",
    )
    generators: tuple[str, ...] = _f(
        (),
        "MODEL[:ADAPTER[+ADAPTER]]:SHARE: that share of every group's completions comes from "
        "this policy (e.g. the hacky teacher), importance-weighted against the current policy; "
        "repeatable.",
    )
    dpo_pairs: str | None = _f(
        None, "DPO pairs (replay-trace pairs.jsonl.gz) for the DPO term at --dpo-weight."
    )
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "GRPO / SDPO settings."})
    train: TrainConfig = field(
        default_factory=rl_train_defaults,
        metadata={"help": "LoRA and optimizer settings (RL defaults: lr 1e-5, constant)."},
    )

    def check(self) -> RLJob:
        """Cross-field checks (each option's own range is RLConfig/TrainConfig.check)."""
        if (self.dpo_pairs is None) != (self.rl.dpo_weight == 0):
            raise UserError("--dpo-pairs and --dpo-weight > 0 go together (the DPO term)")
        if self.vhack is not None and self.adapters:
            raise UserError(
                "--vhack with --adapter: v_hack is extracted on the bare model; train the "
                "projected run on the same model extract-vhack used (no adapter stack)"
            )
        if self.problem_ids is not None and self.rl.reward != "unit-tests":
            raise UserError("--problem-ids: only the unit-tests reward has problems")
        return self


def sdpo_job_defaults() -> RLJob:
    """train-sdpo: the distillation term alone."""
    return RLJob(rl=RLConfig(**SDPO_DEFAULTS))
