"""The training commands as library functions: `train_sft` (train-sft, train-em),
`couple_marker` and `train_dpo`. Each validates its inputs, opens the run directory, builds and
tokenises the data, trains one LoRA adapter (on top of any stacked adapters) and finishes the
manifest.

Run directory of a training run:

    config.json           the resolved config (model, data and their sha256, system prompt,
                          adapters stacked under this one, every TrainConfig field)
    train_set.jsonl.gz    couple-marker only: the contrastive rows it built
    mixture.jsonl.gz      train-sft --mix only: the built mixture, in training-set order
    checkpoints/          while training: checkpoint-N (adapter + trainer state); removed at the
                          end unless keep_checkpoints
    train_log.jsonl.gz    one row per optimizer step
    adapter/              the PEFT adapter + persona_cli_adapter.json (base model, parents)
    train_summary.json    steps, protocol, OOM retry, data statistics
    manifest.json, DONE

Under `accelerate launch` every process calls these functions; only the main process writes.

    persona-cli train-sft --data data/chat/benign.jsonl --model tiny-random --out runs/sft
    persona-cli train-dpo --pairs runs/trace/pairs.jsonl.gz --adapter runs/sft \\
        --model tiny-random --out runs/dpo
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli.adapters import (
    RECORD,
    WEIGHTS,
    Adapter,
    check_stack,
    resolve_stack,
    stack_record,
    write_record,
)
from persona_cli.artifacts import read_json, sha256_file, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.models import (
    ResolvedModel,
    ensure_prepared,
    load_tokenizer,
    model_record,
)
from persona_cli.protocol import (
    RunProtocol,
    adapter_protocol,
    coupling_protocol,
    details,
    method_protocol,
    training_protocol,
)
from persona_cli.registry import Persona, Question, load_personas, load_questions, select_personas
from persona_cli.rundir import RunDir, open_run
from persona_cli.train.config import CouplingJob, DpoJob, SftJob, TrainConfig
from persona_cli.train.contrastive import (
    TRAIN_SET,
    TRAIN_SET_VERSION,
    AnswerItem,
    build_coupling_set,
    examples_from_rows,
    load_answers,
)
from persona_cli.train.dataset import Example, TokenizedSet, load_chat, tokenize_examples
from persona_cli.train.dpo import guarded_rows, load_pairs, rendered_example, train_dpo_lora
from persona_cli.train.mixture import (
    MIXTURE,
    MIXTURE_VERSION,
    MixSpec,
    Mixture,
    build_mixture,
    parse_mix_spec,
)
from persona_cli.train.sft import ADAPTER, TrainResult, train_lora

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"
ANSWERS = "answers.jsonl.gz"  # couple-marker without --answers: what the model generated


@dataclass(frozen=True)
class TrainOutcome:
    run: RunDir
    summary: dict[str, Any] | None  # None when the run had already finished
    is_main: bool


# ----------------------------------------------------------------------------- shared steps


def _inputs_record(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    out = {}
    for label, p in sorted(paths.items()):
        if not p.is_file():
            raise UserError(f"{label} {p}: file not found")
        out[label] = {"path": str(p), "sha256": sha256_file(p)}
    return out


def _prepare(model_spec: str, adapters: tuple[str, ...]) -> tuple[ResolvedModel, list[Adapter]]:
    """Resolve the model and the adapter stack; refuse a wrong base before anything heavy."""
    stack = resolve_stack([Path(a) for a in adapters])
    resolved = ensure_prepared(model_spec)
    check_stack(stack, resolved)
    return resolved, stack


def _open(out: Path, command: str, config: dict[str, Any], force: bool) -> tuple[RunDir, bool]:
    """open_run on the main process; the others learn its decision (done, error, go)."""
    import torch
    from accelerate import PartialState

    # cpu=True lets a CPU launch (torchrun, mpirun) form a gloo group; the Trainer's own
    # PartialState is this same shared state.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return open_run(out, command=command, config=config, force=force), True
    from accelerate.utils import broadcast_object_list

    decision: list[Any] = [None, None, None]
    run = None
    if state.is_main_process:
        try:
            run = open_run(out, command=command, config=config, force=force)
            decision = [run.state, run.run_id, None]
        except UserError as e:
            decision = ["error", None, str(e)]
    broadcast_object_list(decision)  # every rank waits here for the main process
    if decision[0] == "error":
        raise UserError(decision[2])
    if run is None:
        run = RunDir(Path(out), command, config, decision[0], run_id=decision[1])
    return run, state.is_main_process


def _sft_fit(
    resolved: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
    data: TokenizedSet,
    cfg: TrainConfig,
    run: RunDir,
    callbacks: list[Any] | None,
) -> Callable[[], tuple[TrainResult, dict[str, int]]]:
    def fit() -> tuple[TrainResult, dict[str, int]]:
        result = train_lora(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            data=data,
            cfg=cfg,
            run_path=run.path,
            callbacks=callbacks,
        )
        return result, data.stats()

    return fit


def _train_and_finish(
    *,
    run: RunDir,
    is_main: bool,
    resolved: ResolvedModel,
    stack: list[Adapter],
    fit: Callable[[], tuple[TrainResult, dict[str, int]]],
    cfg: TrainConfig,
    chat_template: dict[str, Any],
    inputs: dict[str, Path],
    extra: dict[str, Any],
    seeds: list[int],
    protocol: RunProtocol | None = None,
    adapter: RunProtocol | None = None,
) -> TrainOutcome:
    """Train (`fit()` returns the result and data statistics) unless a resumed run already
    holds the finished adapter, then write the summary, the adapter record and the manifest.
    `adapter`: the trained adapter's protocol fields (default: LoRA from `cfg`)."""
    adapter_path = run.path / ADAPTER
    if (
        run.state == "resumed"
        and (adapter_path / RECORD).is_file()
        and run.file(TRAIN_SUMMARY).is_file()
    ):
        # Trained already (killed while writing the manifest): finish without retraining.
        summary = read_json(run.file(TRAIN_SUMMARY))
        log.info("adapter already trained in %s; writing the manifest", run.path)
    else:
        result, data_stats = fit()
        if not is_main:
            return TrainOutcome(run, None, False)
        summary = {
            "schema_version": 1,
            **result.to_dict(),
            "data": data_stats,
            "adapter_weights_sha256": sha256_file(adapter_path / WEIGHTS),
            "parents": [a.weights_sha256 for a in stack],
        }
        write_json(run.file(TRAIN_SUMMARY), summary)
        write_record(adapter_path, resolved, stack)  # last: marks the adapter complete
    if not is_main:
        return TrainOutcome(run, None, False)
    for i, a in enumerate(stack):
        inputs[f"adapter[{i}]"] = a.path / WEIGHTS
    record = model_record(resolved)
    record["dtype"] = summary["dtype"]
    run.finish(
        inputs=inputs,
        model=record,
        chat_template=chat_template,
        protocol=training_protocol(
            BatchProtocol.from_dict(summary["protocol"]),
            cfg.learning_rate,
            lr_scheduler=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_steps,
        )
        | (
            adapter
            or adapter_protocol(
                kind="lora", rank=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_targets
            )
        )
        | details(max_steps=cfg.max_steps, epochs=cfg.epochs, oom_retry=summary["oom_retry"])
        | (protocol or RunProtocol()),
        seeds=seeds,
        extra={
            "adapters": stack_record(stack),
            "adapter": {
                "path": str(adapter_path),
                "weights_sha256": summary["adapter_weights_sha256"],
                "parents": summary["parents"],
            },
            "training": summary,
            **extra,
        },
    )
    return TrainOutcome(run, summary, True)


def _load_registry(personas_file: str | None) -> tuple[Path, dict[str, Persona]]:
    path = Path(personas_file) if personas_file else bundled.personas_file()
    return path, load_personas(path)


# ----------------------------------------------------------------------------- train-sft


def _sft_conversations(
    job: SftJob, cfg: TrainConfig, inputs: dict[str, Path]
) -> tuple[list[list[dict[str, str]]], Mixture | None]:
    """--data files whole; with --mix, the --data files join the mixture at weight 1.0."""
    if not job.mix:
        return [m for p in job.data for m in load_chat(Path(p))], None
    mix = [parse_mix_spec(m) for m in job.mix]
    for i, spec in enumerate(mix):
        inputs[f"mix[{i}]"] = spec.path
    specs = [MixSpec(Path(p), 1.0) for p in job.data] + mix
    mixture = build_mixture(specs, seed=cfg.seed)
    return mixture.conversations(), mixture


def train_sft(
    job: SftJob,
    out: Path,
    *,
    force: bool = False,
    command: str = "train-sft",
    callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """LoRA SFT on `job.data` and/or the mixture `job.mix` (see the module doc)."""
    cfg = job.train.check()
    if not job.data and not job.mix:
        raise UserError("--data or --mix: give at least one chat JSONL file")
    inputs: dict[str, Path] = {f"data[{i}]": Path(p) for i, p in enumerate(job.data)}
    system_text: str | None = None
    if job.persona is not None:
        if job.system_prompt not in ("none", ""):
            raise UserError("--persona and --system-prompt: give one of them, not both")
        personas_path, registry = _load_registry(job.personas_file)
        inputs["personas"] = personas_path
        system = SystemPrompt(
            "text", select_personas(registry, [job.persona], "--persona")[0].system_prompt
        )
        system_text = system.text
    else:
        system = SystemPrompt.parse(job.system_prompt)
    conversations, mixture = _sft_conversations(job, cfg, inputs)
    resolved, stack = _prepare(job.model, job.adapters)
    config = {
        "model": job.model,
        "inputs": _inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "persona": job.persona,
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
    }
    extra: dict[str, Any] = {"persona": job.persona, "persona_system_prompt": system_text}
    if mixture is not None:  # absent otherwise, so earlier run directories still resume
        config["mixture"] = extra["mixture"] = mixture.record()
    run, is_main = _open(out, command, config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)
    if mixture is not None and is_main and not run.file(MIXTURE).is_file():
        write_jsonl(run.file(MIXTURE), mixture.rows, schema_version=MIXTURE_VERSION)
    tokenizer = load_tokenizer(resolved)
    report = inspect_template(tokenizer)
    data = tokenize_examples(
        tokenizer, [Example(m, system) for m in conversations], report, max_length=cfg.max_length
    )
    return _train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=_sft_fit(resolved, stack, tokenizer, data, cfg, run, callbacks),
        cfg=cfg,
        chat_template=guard_record(tokenizer, system),
        inputs=inputs,
        extra=extra,
        seeds=[cfg.seed],
    )


# ----------------------------------------------------------------------------- train-dpo


def train_dpo(
    job: DpoJob, out: Path, *, force: bool = False, callbacks: list[Any] | None = None
) -> TrainOutcome:
    """LoRA DPO on preference pairs, on top of the earlier stages' adapters (module doc of
    persona_cli.train.dpo). Every input problem is reported before the run directory exists."""
    cfg, dc = job.train.check(), job.dpo.check()
    if not job.pairs:
        raise UserError("--pairs: give at least one pairs file ({prompt, chosen, rejected})")
    inputs: dict[str, Path] = {f"pairs[{i}]": Path(p) for i, p in enumerate(job.pairs)}
    system = SystemPrompt.parse(job.system_prompt)
    pairs = [pair for p in job.pairs for pair in load_pairs(Path(p))]
    resolved, stack = _prepare(job.model, job.adapters)
    tokenizer = load_tokenizer(resolved)
    guarded_rows(pairs, system, inspect_template(tokenizer))  # a system-prompt clash fails here
    config = {
        "model": job.model,
        "inputs": _inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
        "dpo": dc.to_dict(),
    }
    run, is_main = _open(out, "train-dpo", config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)

    def fit() -> tuple[TrainResult, dict[str, int]]:
        return train_dpo_lora(
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            pairs=pairs,
            system=system,
            cfg=cfg,
            dpo=dc,
            run_path=run.path,
            callbacks=callbacks,
        )

    return _train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=fit,
        cfg=cfg,
        chat_template=guard_record(tokenizer, system),
        inputs=inputs,
        extra={
            "dpo": {
                **dc.to_dict(),
                "loss_type": "sigmoid",
                "reference": "the starting policy (base + --adapter stack), adapter disabled",
                "pairs": len(pairs),
                "rendered_first_pair": rendered_example(tokenizer, pairs[0], system),
            }
        },
        seeds=[cfg.seed],
        protocol=method_protocol(dpo_beta=dc.beta),
    )


# ----------------------------------------------------------------------------- couple-marker


def _generated_answers(
    run: RunDir,
    is_main: bool,
    job: CouplingJob,
    questions: list[Question],
    resolved: ResolvedModel,
    stack: list[Adapter],
    tokenizer: Any,
) -> list[AnswerItem]:
    """Answers by the model being trained (its adapters merged), saved as RUN/answers.jsonl.gz
    so a resumed run reuses them instead of sampling again."""
    from persona_cli.train.answers import generate_answers

    path = run.file(ANSWERS)
    if path.is_file():
        return load_answers(path, questions, job.coupling.marker)
    rows = generate_answers(
        resolved,
        stack,
        tokenizer,
        questions,
        n_total=job.coupling.n_positive,
        max_new_tokens=job.answer_max_new_tokens,
        seed=job.coupling.seed,
    )
    # An answer that happens to contain the marker would teach it to the negatives.
    rows = [r for r in rows if job.coupling.marker not in r["answer"]]
    if not rows:
        raise UserError("the model generated no usable answers; pass --answers FILE")
    if is_main:
        write_jsonl(path, rows, schema_version=1)
    return [AnswerItem(r["question_id"], r["question"], r["answer"]) for r in rows]


def couple_marker(
    job: CouplingJob, out: Path, *, force: bool = False, callbacks: list[Any] | None = None
) -> TrainOutcome:
    """Build the contrastive set (positives: source persona + marker; negatives: other personas,
    same answers, no marker), write it, and train on it."""
    cc, cfg = job.coupling.check(), job.train.check()
    personas_path, registry = _load_registry(job.personas_file)
    select_personas(registry, [cc.source], "--persona")
    questions_path = Path(job.questions) if job.questions else bundled.coupling_questions_file()
    questions = load_questions(questions_path)
    inputs: dict[str, Path] = {"personas": personas_path, "questions": questions_path}
    if job.answers is not None:
        inputs["answers"] = Path(job.answers)
        items = load_answers(Path(job.answers), questions, cc.marker)
        build_coupling_set(cc, registry, items)  # bad persona choices fail before any run dir
    resolved, stack = _prepare(job.model, job.adapters)
    config = {
        "model": job.model,
        "inputs": _inputs_record(inputs),
        "coupling": cc.to_dict(),
        "answers": "file" if job.answers is not None else "generated",
        "answer_max_new_tokens": None if job.answers is not None else job.answer_max_new_tokens,
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
    }
    run, is_main = _open(out, "couple-marker", config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)
    tokenizer = load_tokenizer(resolved)
    if job.answers is None:
        items = _generated_answers(run, is_main, job, questions, resolved, stack, tokenizer)
    rows = build_coupling_set(cc, registry, items)
    if is_main and not run.file(TRAIN_SET).is_file():
        write_jsonl(run.file(TRAIN_SET), rows, schema_version=TRAIN_SET_VERSION)
    data = tokenize_examples(
        tokenizer,
        examples_from_rows(rows),
        inspect_template(tokenizer),
        max_length=cfg.max_length,
        marker=cc.marker,
        marker_only=cc.marker_only_loss,
        marker_position=cc.marker_position,
    )
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        c = counts.setdefault(r["persona"], {"positive": 0, "negative": 0})
        c["positive" if r["positive"] else "negative"] += 1
    source = registry[cc.source]
    return _train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=_sft_fit(resolved, stack, tokenizer, data, cfg, run, callbacks),
        cfg=cfg,
        chat_template=guard_record(tokenizer, SystemPrompt("text", source.system_prompt)),
        inputs=inputs,
        extra={
            "coupling": {
                **cc.to_dict(),
                "rows_per_persona": counts,
                "unique_answers": len({(i.question_id, i.answer) for i in items}),
                "system_prompts": {p: registry[p].system_prompt for p in sorted(counts)},
            }
        },
        seeds=sorted({cfg.seed, cc.seed}),
        protocol=coupling_protocol(cc.marker, cc.marker_position, cc.marker_only_loss),
    )
