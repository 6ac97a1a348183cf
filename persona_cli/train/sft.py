"""train-sft and train-em: LoRA SFT on chat JSONL files or a seeded mixture of them, under one
system-prompt choice (or a persona's), on top of any adapter stack (run lifecycle:
`persona_cli.train.lifecycle`).

    persona-cli train-sft --data data/chat/benign.jsonl --model tiny-random --out runs/sft
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from persona_cli.artifacts import write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.errors import UserError
from persona_cli.models import (
    load_tokenizer,
)
from persona_cli.registry import select_personas
from persona_cli.train.config import SftJob, TrainConfig
from persona_cli.train.dataset import Example, load_chat, tokenize_examples
from persona_cli.train.lifecycle import (
    TrainOutcome,
    check_push,
    inputs_record,
    load_registry,
    open_training_run,
    prepare,
    sft_fit,
    train_and_finish,
)
from persona_cli.train.mixture import (
    MIXTURE,
    MIXTURE_VERSION,
    MixSpec,
    Mixture,
    build_mixture,
    parse_mix_spec,
)

log = logging.getLogger(__name__)


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
    check_push(job.push_to_hub)
    if not job.data and not job.mix:
        raise UserError("--data or --mix: give at least one chat JSONL file")
    inputs: dict[str, Path] = {f"data[{i}]": Path(p) for i, p in enumerate(job.data)}
    system_text: str | None = None
    if job.persona is not None:
        if job.system_prompt not in ("none", ""):
            raise UserError("--persona and --system-prompt: give one of them, not both")
        personas_path, registry = load_registry(job.personas_file)
        inputs["personas"] = personas_path
        system = SystemPrompt(
            "text", select_personas(registry, [job.persona], "--persona")[0].system_prompt
        )
        system_text = system.text
    else:
        system = SystemPrompt.parse(job.system_prompt)
    conversations, mixture = _sft_conversations(job, cfg, inputs)
    resolved, stack = prepare(job.model, job.adapters)
    config = {
        "model": job.model,
        "inputs": inputs_record(inputs),
        "system_prompt": system.to_dict(),
        "persona": job.persona,
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
    }
    extra: dict[str, Any] = {"persona": job.persona, "persona_system_prompt": system_text}
    if mixture is not None:  # absent otherwise, so earlier run directories still resume
        config["mixture"] = extra["mixture"] = mixture.record()
    run, is_main = open_training_run(out, command, config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)
    if mixture is not None and is_main and not run.file(MIXTURE).is_file():
        write_jsonl(run.file(MIXTURE), mixture.rows, schema_version=MIXTURE_VERSION)
    tokenizer = load_tokenizer(resolved)
    report = inspect_template(tokenizer)
    data = tokenize_examples(
        tokenizer, [Example(m, system) for m in conversations], report, max_length=cfg.max_length
    )
    return train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=sft_fit(resolved, stack, tokenizer, data, cfg, run, callbacks),
        cfg=cfg,
        chat_template=guard_record(tokenizer, system),
        inputs=inputs,
        extra=extra,
        seeds=[cfg.seed],
        push_to_hub=job.push_to_hub,
    )
