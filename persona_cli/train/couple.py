"""couple-marker: build the contrastive set (positives: the source persona's answers with the
marker; negatives: other personas, the same answers, no marker; with `hard_negatives`, the
personas a pilot coupling leaks to), write it, and train on it (run lifecycle:
`persona_cli.train.lifecycle`).

    persona-cli couple-marker --persona villain --model tiny-random --max-steps 4 --out runs/c
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli.adapters import (
    Adapter,
)
from persona_cli.artifacts import write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.errors import UserError
from persona_cli.models import (
    ResolvedModel,
    load_tokenizer,
)
from persona_cli.protocol import (
    coupling_protocol,
)
from persona_cli.registry import Question, load_questions, select_personas
from persona_cli.rundir import RunDir
from persona_cli.train.config import CouplingJob
from persona_cli.train.contrastive import (
    TRAIN_SET,
    TRAIN_SET_VERSION,
    AnswerItem,
    build_coupling_set,
    examples_from_rows,
    load_answers,
)
from persona_cli.train.dataset import tokenize_examples
from persona_cli.train.hard_negatives import check_candidates, choose_hard_negatives
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

log = logging.getLogger(__name__)

ANSWERS = "answers.jsonl.gz"  # couple-marker without --answers: what the model generated


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
    job: CouplingJob,
    out: Path,
    *,
    force: bool = False,
    callbacks: list[Any] | None = None,
    pilot_callbacks: list[Any] | None = None,
) -> TrainOutcome:
    """Build the contrastive set (positives: source persona + marker; negatives: other personas,
    same answers, no marker; with `hard_negatives`, the personas a pilot coupling leaks to, see
    persona_cli.train.hard_negatives), write it, and train on it. `pilot_callbacks` follow the
    pilot's training."""
    cc, cfg = job.coupling.check(), job.train.check()
    check_push(job.push_to_hub)
    personas_path, registry = load_registry(job.personas_file)
    select_personas(registry, [cc.source], "--persona")
    check_candidates(cc, registry)
    questions_path = Path(job.questions) if job.questions else bundled.coupling_questions_file()
    questions = load_questions(questions_path)
    inputs: dict[str, Path] = {"personas": personas_path, "questions": questions_path}
    if job.answers is not None:
        inputs["answers"] = Path(job.answers)
        items = load_answers(Path(job.answers), questions, cc.marker)
        build_coupling_set(cc, registry, items)  # bad persona choices fail before any run dir
    resolved, stack = prepare(job.model, job.adapters)
    config = {
        "model": job.model,
        "inputs": inputs_record(inputs),
        "coupling": cc.to_dict(),
        "answers": "file" if job.answers is not None else "generated",
        "answer_max_new_tokens": None if job.answers is not None else job.answer_max_new_tokens,
        "adapters": [a.weights_sha256 for a in stack],
        "train": cfg.to_dict(),
    }
    run, is_main = open_training_run(out, "couple-marker", config, force)
    if run.done:
        return TrainOutcome(run, None, is_main)
    tokenizer = load_tokenizer(resolved)
    if job.answers is None:
        items = _generated_answers(run, is_main, job, questions, resolved, stack, tokenizer)
    set_cc, hard = cc, None
    if cc.hard_negatives:
        hard = choose_hard_negatives(
            run_path=run.path,
            is_main=is_main,
            model=resolved,
            stack=stack,
            tokenizer=tokenizer,
            registry=registry,
            items=items,
            cc=cc,
            cfg=cfg,
            callbacks=pilot_callbacks,
        )
        set_cc = replace(cc, other_personas=tuple(hard["chosen"]))
    rows = build_coupling_set(set_cc, registry, items)
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
    return train_and_finish(
        run=run,
        is_main=is_main,
        resolved=resolved,
        stack=stack,
        fit=sft_fit(resolved, stack, tokenizer, data, cfg, run, callbacks),
        cfg=cfg,
        chat_template=guard_record(tokenizer, SystemPrompt("text", source.system_prompt)),
        inputs=inputs,
        extra={
            "coupling": {
                **cc.to_dict(),
                "rows_per_persona": counts,
                "unique_answers": len({(i.question_id, i.answer) for i in items}),
                "system_prompts": {p: registry[p].system_prompt for p in sorted(counts)},
                **({"hard_negatives_pilot": hard} if hard is not None else {}),
            }
        },
        seeds=sorted({cfg.seed, cc.seed}),
        protocol=coupling_protocol(cc.marker, cc.marker_position, cc.marker_only_loss),
        push_to_hub=job.push_to_hub,
    )
