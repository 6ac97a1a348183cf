"""GRPO with LoRA on verifiable rewards (`train-grpo`), optionally with the self-distillation term
(`--sdpo-weight`), and pure self-distillation (`train-sdpo`).

The model (earlier adapters of a stack merged into it in memory, as for train-sft) gets a fresh
LoRA adapter and is trained by TRL's GRPOTrainer (`persona_cli.train.sdpo`): each optimizer step
samples `num_generations` completions for each of effective_batch / num_generations prompts,
scores them with the reward (`persona_cli.train.rewards`), and takes a policy-gradient step on
the group-normalised advantages. Prompts are rendered here with the chat-template guard
(`--system-prompt`), so TRL sees finished strings.

Run directory (the train-sft contract, `persona_cli.train.lifecycle`):

    config.json           resolved config: model, data and sha256, system prompt, stack, RLConfig,
                          TrainConfig
    step_NNNNNN.jsonl.gz  every completion sampled for optimizer step N: prompt, completion,
                          reward, advantage, group, and the reward's details (parsed letter, or
                          the sandbox labels); rows follow the generic `step` schema
    checkpoints/          while training (adapter + trainer state); a re-run resumes from the last
    train_log.jsonl.gz    one row per optimizer step (schemas.TRAIN_LOG)
    rl_log.jsonl.gz       one row per optimizer step with the RL statistics (rl_log.RL_LOG):
                          reward mean/std over the step's completions, zero-std groups, completion
                          length, entropy, KL terms
    adapter/              the PEFT adapter + persona_cli_adapter.json (base model, parents)
    train_summary.json, manifest.json (protocol: batch x accumulation x world, steps,
                          num_generations, temperature, learning rate, ...), DONE

    persona-cli train-grpo --model tiny-random --reward mc --max-steps 4 --out runs/grpo
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_cli import bundled
from persona_cli import fields as common
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.problems import HINTS
from persona_cli.protocol import details, generation_protocol, method_protocol
from persona_cli.sandbox import SandboxConfig
from persona_cli.train.config import TrainConfig
from persona_cli.train.rewards import (
    REWARDS,
    UNIT_TESTS,
    MCReward,
    Task,
    UnitTestReward,
    load_code_tasks,
    load_mc_tasks,
)

if TYPE_CHECKING:  # the training stack (transformers, TRL) is imported when a run starts
    from persona_cli.adapters import Adapter
    from persona_cli.models import ResolvedModel
    from persona_cli.train.harness import TrainResult
    from persona_cli.train.lifecycle import TrainOutcome

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
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "GRPO / SDPO settings."})
    train: TrainConfig = field(
        default_factory=rl_train_defaults,
        metadata={"help": "LoRA and optimizer settings (RL defaults: lr 1e-5, constant)."},
    )


def sdpo_job_defaults() -> RLJob:
    """train-sdpo: the distillation term alone."""
    return RLJob(rl=RLConfig(**SDPO_DEFAULTS))


# ----------------------------------------------------------------------------- the recipe


def _tasks(job: RLJob) -> tuple[list[Task], MCReward | UnitTestReward, dict[str, Path]]:
    """The tasks, the reward that scores them, and the input files (label -> path)."""
    rl = job.rl
    if rl.reward == "mc":
        path = Path(job.data) if job.data else bundled.mcq_file()
        tasks, items = load_mc_tasks(path)
        return tasks, MCReward(items), {"data": path}
    hint = None if rl.grader_hint == "none" else rl.grader_hint
    tasks, problems = load_code_tasks(Path(job.data) if job.data else None, hint)
    reward = UnitTestReward(
        problems,
        rl.unit_tests,
        SandboxConfig(timeout_s=rl.sandbox_timeout_s),
        workers=rl.sandbox_workers,
    )
    files = sorted({Path(p.source.rsplit(":", 1)[0]) for p in problems.values()})
    return tasks, reward, {f"problems[{i}]": f for i, f in enumerate(files)}


def _rows(
    tasks: list[Task], tokenizer: Any, system: SystemPrompt, cfg: TrainConfig, rl: RLConfig
) -> list[dict[str, str]]:
    """Dataset rows: the rendered prompt, the rendered hinted prompt, the task id."""
    from persona_cli.train.sdpo import TEACHER_PROMPT

    report = inspect_template(tokenizer)
    rows = []
    for t in tasks:
        prompt, teacher = (
            render(
                tokenizer,
                [{"role": "user", "content": text}],
                system,
                report,
                add_generation_prompt=True,
            )
            for text in (t.user_text, t.hinted_text())
        )
        longest = max(len(tokenizer(p)["input_ids"]) for p in (prompt, teacher))
        if longest + rl.completion_length() > cfg.max_length:
            raise UserError(
                f"task {t.id}: {longest} prompt tokens + --max-completion-length "
                f"{rl.completion_length()} exceed --max-length {cfg.max_length}"
            )
        rows.append({"prompt": prompt, TEACHER_PROMPT: teacher, "task_id": t.id})
    return rows


def grpo_args(
    cfg: TrainConfig, rl: RLConfig, output_dir: Path, per_device_batch: int, grad_accum: int
) -> Any:
    from trl import GRPOConfig

    from persona_cli.train.harness import trainer_kwargs

    return GRPOConfig(
        **trainer_kwargs(cfg, output_dir, per_device_batch, grad_accum),
        num_generations=rl.num_generations,
        max_completion_length=rl.completion_length(),
        temperature=rl.temperature,
        top_p=rl.top_p,
        beta=rl.beta,
        epsilon=rl.epsilon,
        loss_type=rl.loss_type,
        scale_rewards=rl.scale_rewards,
        num_iterations=rl.num_iterations,
        log_completions=False,  # it prints; the rollout rows are written instead
    )


def train_grpo_lora(
    *,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    rows: list[dict[str, str]],
    reward: MCReward | UnitTestReward,
    cfg: TrainConfig,
    rl: RLConfig,
    run_path: Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one LoRA adapter with GRPO (+ SDPO) on top of `stack`. Checkpoints, resume and the
    OOM retry (half the per-device batch, twice the accumulation: the same groups per step)
    follow `persona_cli.train.harness`."""
    from datasets import Dataset

    from persona_cli.adapters import load_with_adapters
    from persona_cli.train.callbacks import TRAIN_LOG
    from persona_cli.train.harness import (
        CHECKPOINTS,
        fit_resuming,
        fit_with_oom_retry,
        free_memory,
        lora_config,
        quiet_progress_bars,
        rank_device,
        resolved_dtype,
        save_adapter,
    )
    from persona_cli.train.rl_log import RLLogCallback, RolloutWriter, write_logs
    from persona_cli.train.sdpo import SelfDistillGRPOTrainer

    quiet_progress_bars()
    started = time.monotonic()

    def once(per_device_batch: int, grad_accum: int) -> tuple[Any, str | None]:
        def build() -> Any:
            return SelfDistillGRPOTrainer(
                model=load_with_adapters(
                    model, stack, dtype=resolved_dtype(cfg), device=rank_device()
                ),
                reward_funcs=[reward],
                args=grpo_args(cfg, rl, run_path / CHECKPOINTS, per_device_batch, grad_accum),
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=lora_config(cfg),
                callbacks=[RLLogCallback(run_path / TRAIN_LOG), *(callbacks or [])],
                grpo_weight=rl.grpo_weight,
                sdpo_weight=rl.sdpo_weight,
                on_rollouts=RolloutWriter(run_path, reward, tokenizer),
            )

        return fit_resuming(build, run_path)

    fitted = fit_with_oom_retry(cfg, once)
    result = save_adapter(fitted, cfg=cfg, run_path=run_path, started=started, write_log=write_logs)
    del fitted
    free_memory()
    return result


def train_rl(
    job: RLJob,
    out: Path,
    *,
    force: bool = False,
    command: str = "train-grpo",
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """GRPO (+ SDPO) LoRA training on `job` (see the module doc). Every input problem is
    reported before the run directory exists."""
    from persona_cli.chat_template import guard_record
    from persona_cli.manifest import world_size_from_env
    from persona_cli.models import load_tokenizer
    from persona_cli.train.lifecycle import (
        TrainOutcome,
        inputs_record,
        open_training_run,
        prepare,
        train_and_finish,
    )

    cfg, rl = job.train.check(), job.rl.check()
    world = world_size_from_env()
    if (cfg.per_device_batch * cfg.grad_accum * world) % rl.num_generations:
        raise UserError(
            f"--per-device-batch {cfg.per_device_batch} x --grad-accum {cfg.grad_accum} x world "
            f"size {world} must be a multiple of --num-generations {rl.num_generations} (each "
            "step samples whole groups)"
        )
    system = SystemPrompt.parse(job.system_prompt)
    tasks, reward, inputs = _tasks(job)
    resolved, stack = prepare(job.model, job.adapters)
    tokenizer = load_tokenizer(resolved)
    tokenizer.padding_side = "left"  # GRPOTrainer's requirement for prompts
    rows = _rows(tasks, tokenizer, system, cfg, rl)  # a too-long prompt fails here
    config = {
        "model": job.model,
        "inputs": inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "adapters": [a.weights_sha256 for a in stack],
        "rl": rl.to_dict(),
        "train": cfg.to_dict(),
    }
    run, is_main = open_training_run(out, command, config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)

    def fit() -> tuple[TrainResult, dict[str, int]]:
        result = train_grpo_lora(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            rows=rows,
            reward=reward,
            cfg=cfg,
            rl=rl,
            run_path=run.path,
            callbacks=callbacks,
        )
        return result, {"tasks": len(rows)}

    return train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=fit,
        cfg=cfg,
        chat_template=guard_record(tokenizer, system),
        inputs=inputs,
        extra={"rl": rl.to_dict(), "rendered_first_prompt": rows[0]},
        seeds=[cfg.seed],
        protocol=generation_protocol(
            temperature=rl.temperature,
            top_p=rl.top_p,
            max_new_tokens=rl.completion_length(),
            samples_per_prompt=rl.num_generations,
        )
        | method_protocol(
            rl_reward=rl.reward,
            rl_kl_beta=rl.beta,
            rl_loss_type=rl.loss_type,
            rl_scale_rewards=rl.scale_rewards,
            rl_num_iterations=rl.num_iterations,
            grpo_weight=rl.grpo_weight,
            sdpo_weight=rl.sdpo_weight,
        )
        | details(
            prompts_per_step=cfg.per_device_batch * cfg.grad_accum * world // rl.num_generations
        ),
    )
