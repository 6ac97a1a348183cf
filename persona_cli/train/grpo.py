"""GRPO on verifiable rewards (`train-grpo`), optionally with the self-distillation term
(`--sdpo-weight`) and the DPO term (`--dpo-pairs`), and pure self-distillation (`train-sdpo`).

The model (earlier adapters of a stack merged into it in memory, as for train-sft) gets a fresh
adapter (`--adapter-kind lora`, or `svd`: a delta on the top singular values, built by
`persona_cli.probe.adapters` so a v_hack lives in its parameter space) and is trained by TRL's
GRPOTrainer (`persona_cli.train.rl_trainer`): each optimizer step samples `num_generations`
completions for each of effective_batch / num_generations prompts (a share of them from other
policies with `--generator`, `persona_cli.train.mixed`), scores them with the reward
(`persona_cli.train.rewards`), and takes a policy-gradient step on the group-normalised
advantages, with v_hack projected out of the update under `--vhack`
(`persona_cli.train.projection`). Prompts are rendered here with the chat-template guard
(`--system-prompt`), so TRL sees finished strings. Every input is checked before the run
directory opens (a v_hack of another model or adapter, a generator share that does not divide
the group, a problem id not in the problem file: one line, exit 2).

Run directory (the train-sft contract, `persona_cli.train.lifecycle`):

    config.json           resolved config: model, data and sha256, system prompt, stack, RLConfig,
                          TrainConfig, v_hack / generators / DPO pairs
    step_NNNNNN.jsonl.gz  every completion sampled for optimizer step N: prompt, completion and
                          its token ids, reward, advantage, group, which policy wrote it, the
                          reward's details (parsed letter, or the sandbox labels), why a group
                          has zero advantage; rows follow the generic `step` schema
    checkpoints/          while training (adapter + trainer state); a re-run resumes from the last
    train_log.jsonl.gz    one row per optimizer step (schemas.TRAIN_LOG; proj_* under --vhack)
    rl_log.jsonl.gz       one row per optimizer step with the RL statistics (rl_log.RL_LOG)
    adapter/              the adapter (PEFT LoRA or svd delta) + persona_cli_adapter.json
    train_summary.json, manifest.json (protocol: batch x accumulation x world, steps,
                          num_generations, temperature, learning rate, projection, ...), DONE

    persona-cli train-grpo --model tiny-random --reward mc --max-steps 4 --out runs/grpo
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_cli import bundled
from persona_cli.artifacts import sha256_file
from persona_cli.chat_template import SystemPrompt, inspect_template, render
from persona_cli.errors import UserError
from persona_cli.probe.config import AdapterConfig
from persona_cli.protocol import (
    RunProtocol,
    adapter_protocol,
    details,
    generation_protocol,
    method_protocol,
)
from persona_cli.sandbox import SandboxConfig
from persona_cli.train.config import TrainConfig
from persona_cli.train.mixed import GeneratorSpec, plan_slots
from persona_cli.train.rewards import (
    MCReward,
    Task,
    UnitTestReward,
    load_code_tasks,
    load_mc_tasks,
)
from persona_cli.train.rl_config import RLConfig, RLJob

if TYPE_CHECKING:  # the training stack (transformers, TRL) is imported when a run starts
    from persona_cli.adapters import Adapter
    from persona_cli.models import ResolvedModel
    from persona_cli.train.channels import EncodedPair
    from persona_cli.train.harness import TrainResult
    from persona_cli.train.lifecycle import TrainOutcome


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
    if job.problem_ids is not None:
        missing = [p for p in job.problem_ids if p not in problems]
        if missing:
            where = job.data or "the shipped data/problems"
            raise UserError(
                f"--problem-ids: {', '.join(missing)} not among the problems of {where}"
            )
        tasks = [t for t in tasks if t.id in job.problem_ids]
        problems = {k: v for k, v in problems.items() if k in job.problem_ids}
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


@dataclass(frozen=True)
class RLPlan:
    """What a run adds to plain GRPO, resolved and checked before the run directory opens."""

    adapter: AdapterConfig
    vhack: Path | None
    generators: tuple[GeneratorSpec, ...]
    slots: tuple[int | None, ...]
    dpo_pairs: tuple[EncodedPair, ...] | None

    def protocol(self, rl: RLConfig) -> RunProtocol:
        """The guarded fields of the projection, the generators (adapters by weights hash) and
        the DPO term."""
        from persona_cli.adapters import resolve_stack

        return method_protocol(
            projection=rl.project if self.vhack else "off",
            projection_vhack_sha256=sha256_file(self.vhack) if self.vhack else None,
            projection_modules=list(rl.project_modules) if self.vhack else None,
            rl_generators=[
                [g.model, [a.weights_sha256 for a in resolve_stack(g.adapters)], g.share]
                for g in self.generators
            ],
            dpo_weight=rl.dpo_weight,
        ) | (method_protocol(dpo_beta=rl.dpo_beta) if self.dpo_pairs else RunProtocol())


def plan_run(
    job: RLJob, resolved: ResolvedModel, tokenizer: Any, system: SystemPrompt, cfg: TrainConfig
) -> tuple[RLPlan, dict[str, Path]]:
    """The adapter, v_hack, generators and DPO pairs of `job`, checked; and their input files."""
    from persona_cli.probe.vhack import check_model, load_vhack, vhack_path
    from persona_cli.train.mixed import check_generator_files
    from persona_cli.train.projection import check_adapter

    rl = job.rl
    inputs: dict[str, Path] = {}
    vhack = meta = None
    if job.vhack is not None:
        vhack = vhack_path(job.vhack)
        _, meta = load_vhack(vhack)
        check_model(meta, resolved, job.vhack)
        inputs["vhack"] = vhack
    seed = rl.adapter_init_seed
    if seed is None:
        seed = meta["adapter"]["seed"] if meta is not None else cfg.seed
    adapter = AdapterConfig(
        kind=rl.adapter_kind,
        rank=cfg.lora_r,
        alpha=float(cfg.lora_alpha),
        targets=tuple(cfg.lora_targets),
        seed=seed,
    ).check()
    if meta is not None:
        planned = {
            "kind": adapter.kind,
            "rank": adapter.rank,
            "alpha": adapter.alpha if adapter.kind == "lora" else None,
            "targets": list(adapter.targets),
            "seed": adapter.seed,
        }
        check_adapter(meta, planned, job.vhack)
    specs = tuple(GeneratorSpec.parse(g) for g in job.generators)
    slots = tuple(plan_slots(specs, rl.num_generations)) if specs else ()
    check_generator_files(specs)
    dpo = None
    if job.dpo_pairs is not None:
        from persona_cli.train.channels import encode_pairs
        from persona_cli.train.dpo import load_pairs

        path = Path(job.dpo_pairs)
        if not path.is_file():
            raise UserError(f"--dpo-pairs {path}: file not found")
        dpo = tuple(encode_pairs(load_pairs(path), tokenizer, system, cfg.max_length, path))
        inputs["dpo_pairs"] = path
    return RLPlan(adapter, vhack, specs, slots, dpo), inputs


def train_grpo_adapter(
    *,
    model: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    rows: list[dict[str, str]],
    reward: MCReward | UnitTestReward,
    cfg: TrainConfig,
    rl: RLConfig,
    plan: RLPlan,
    run_path: Path,
    callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one adapter with GRPO (+ SDPO, + DPO) on top of `stack`. Checkpoints, resume and
    the OOM retry (half the per-device batch, twice the accumulation: the same groups per step)
    follow `persona_cli.train.harness`."""
    from datasets import Dataset

    from persona_cli.adapters import load_with_adapters
    from persona_cli.probe.adapters import build_adapter
    from persona_cli.train.callbacks import TRAIN_LOG
    from persona_cli.train.channels import DpoChannel
    from persona_cli.train.harness import (
        CHECKPOINTS,
        fit_resuming,
        fit_with_oom_retry,
        free_memory,
        quiet_progress_bars,
        rank_device,
        resolved_dtype,
        save_adapter,
    )
    from persona_cli.train.mixed import load_generators
    from persona_cli.train.projection import ProjectionCallback, load_projector
    from persona_cli.train.rl_log import RLLogCallback, RolloutWriter, write_logs
    from persona_cli.train.rl_trainer import RLTrainer

    quiet_progress_bars()
    started = time.monotonic()
    dtype, device = resolved_dtype(cfg), rank_device()
    generators = load_generators(plan.generators, tokenizer, dtype=dtype, device=device)

    def once(per_device_batch: int, grad_accum: int) -> tuple[Any, str | None]:
        def build() -> Any:
            base = load_with_adapters(model, stack, dtype=dtype, device=device)
            adapter = build_adapter(
                base,
                plan.adapter,
                dropout=cfg.lora_dropout if plan.adapter.kind == "lora" else 0.0,
                task_type="CAUSAL_LM",
            )
            projection = None
            if plan.vhack is not None:
                projection = ProjectionCallback(
                    load_projector(
                        plan.vhack, model, adapter, rule=rl.project, patterns=rl.project_modules
                    )
                )
            dpo = None
            if plan.dpo_pairs is not None:
                dpo = DpoChannel(
                    list(plan.dpo_pairs),
                    beta=rl.dpo_beta,
                    batch=rl.dpo_batch,
                    seed=cfg.seed,
                    pad_id=tokenizer.pad_token_id,
                )
            return RLTrainer(
                model=adapter.model,
                reward_funcs=[reward],
                args=grpo_args(cfg, rl, run_path / CHECKPOINTS, per_device_batch, grad_accum),
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[RLLogCallback(run_path / TRAIN_LOG), *(callbacks or [])],
                grpo_weight=rl.grpo_weight,
                sdpo_weight=rl.sdpo_weight,
                on_rollouts=RolloutWriter(run_path, reward, tokenizer),
                adapter=adapter,
                projection=projection,
                generators=generators,
                slots=list(plan.slots),
                dpo=dpo,
                dpo_weight=rl.dpo_weight,
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
    """GRPO (+ SDPO, + DPO) training on `job` (see the module doc). Every input is checked
    before the run directory exists."""
    from persona_cli.adapters import resolve_stack
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
    job.check()
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
    plan, extra_inputs = plan_run(job, resolved, tokenizer, system, cfg)
    inputs.update(extra_inputs)
    config = {
        "model": job.model,
        "inputs": inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "adapters": [a.weights_sha256 for a in stack],
        "problem_ids": list(job.problem_ids) if job.problem_ids is not None else None,
        "generators": [
            {"spec": g.text, "adapters": [a.weights_sha256 for a in resolve_stack(g.adapters)]}
            for g in plan.generators
        ],
        "adapter": asdict(plan.adapter),
        "rl": rl.to_dict(),
        "train": cfg.to_dict(),
    }
    run, is_main = open_training_run(out, command, config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)

    def fit() -> tuple[TrainResult, dict[str, int]]:
        result = train_grpo_adapter(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            rows=rows,
            reward=reward,
            cfg=cfg,
            rl=rl,
            plan=plan,
            run_path=run.path,
            callbacks=callbacks,
        )
        return result, {"tasks": len(rows)}

    a = plan.adapter
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
        adapter=adapter_protocol(
            kind=a.kind,
            rank=a.rank,
            alpha=a.alpha if a.kind == "lora" else None,
            targets=a.targets,
        ),
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
        | plan.protocol(rl)
        | details(
            prompts_per_step=cfg.per_device_batch * cfg.grad_accum * world // rl.num_generations,
            adapter_init_seed=a.seed,
            generator_slots=[None if s is None else plan.generators[s].label for s in plan.slots],
            dpo_pairs=len(plan.dpo_pairs) if plan.dpo_pairs else 0,
        ),
    )
