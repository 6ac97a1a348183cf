"""EleutherAI's lm-evaluation-harness as an eval-capability backend (the `lm-eval` extra).

`--backend lm-eval --task T` runs any harness `multiple_choice` task (a registered name such as
`mmlu_moral_scenarios`, a group such as `mmlu`, or a local task YAML) on the same model object
the built-in scorer uses: the base model with the adapter stack applied through PEFT (each
adapter loaded with `PeftModel` and merged, in training order; the harness's own `peft=` takes one
adapter, so a stack goes through ours), handed to the harness's `HFLM` as an initialised model.
Prompts go through the same chat template and system-prompt choice as the built-in scorer: the
harness runs with `apply_chat_template`, and `GuardedHFLM.apply_chat_template` renders its chat
history with `chat_template.render` (so `--persona` / `--system-prompt` and the guard against an
injected default system prompt apply unchanged; a task's description, which the harness would
send as a system message, opens the first user turn instead: `fold_description`).

The harness's `log_samples` become eval-capability rows: option labels A, B, ... by position,
`label_logprobs` the harness's log-likelihood of each choice's continuation, the prediction its
argmax (the harness's `acc`), `gold_index` the task's target; plus `task`, `doc_id`, `choices`
(the scored continuations) and `prompt` (the harness's context). The id is the doc's `id`, else
`SUBJECT/ROW` for MMLU-layout docs (as the built-in reader numbers a file's rows), else
`TASK/DOC_ID`; the subject is the doc's `subject`, else the task name.

One difference from the built-in scorer remains and is measured by the agreement test: the
harness moves the context's trailing whitespace (the newline after the assistant header) into
the continuation, so each choice's log-likelihood is log p("\\n" + letter) = log p(letter) +
log p("\\n" | prompt without it), a constant per item; predictions are unchanged.

    persona-cli eval-capability --backend lm-eval --task data/lm_eval/mini_mmlu.yaml --out RUN
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import bundled
from persona_cli.artifacts import sha256_file, sha256_json
from persona_cli.capability import (
    ROW_SCHEMA_VERSION,
    MCItem,
    item_from_row,
    row_problems,
)
from persona_cli.chat_template import SystemPrompt, TemplateReport, render
from persona_cli.errors import InputError, UserError

INSTALL = "pip install 'persona-cli[lm-eval]'"
SCORER = "lm-eval:acc"  # the harness's multiple_choice acc: argmax of each choice's log-likelihood


def task_file() -> Path:
    """The shipped harness task over data/mcq/mini_mmlu.jsonl with eval-capability's prompt."""
    return bundled.data_dir() / "lm_eval" / "mini_mmlu.yaml"


def require() -> str:
    """The installed harness version; one line naming the install command when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(
            f"--backend lm-eval needs EleutherAI's lm-evaluation-harness: {INSTALL}"
        ) from None
    return str(lm_eval.__version__)


@dataclass(frozen=True)
class TaskSpec:
    """A --task: a harness task name, or a local YAML loaded into a config dict."""

    name: str
    config: dict[str, Any] | None  # None: a registered task or group
    files: dict[str, Path]  # local files read (the YAML, its data files), for the manifest
    manager: Any  # the harness's TaskManager (indexing the built-in tasks takes a while)


def load_task(task: str) -> TaskSpec:
    """`task` as the harness will get it. A path to a YAML is loaded with the harness's own
    loader (so `!function` and `include` work) and its relative `data_files` are resolved
    against the YAML's folder; anything else must be a registered task, group or tag name."""
    from lm_eval.tasks import TaskManager

    path = Path(task)
    if path.suffix not in (".yaml", ".yml"):
        manager = TaskManager()
        if task not in manager.all_tasks:
            raise UserError(
                f"--task {task}: not a task, group or tag the harness knows "
                f"({len(manager.all_tasks)} registered; a local task is a path to a .yaml)"
            )
        return TaskSpec(task, None, {}, manager)
    if not path.is_file():
        raise UserError(f"--task {task}: no such task YAML")
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as e:  # the harness's loader raises yaml, import and value errors
        raise InputError(path, f"not a harness task YAML ({type(e).__name__}: {e})") from None
    if "task" not in config:
        raise InputError(path, "no 'task' name")
    if config.get("output_type") != "multiple_choice":
        raise InputError(
            path,
            f"output_type {config.get('output_type')!r}: eval-capability reads multiple_choice",
        )
    files = {"task": path}
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(data_files, dict):
        resolved = {}
        for split, name in data_files.items():
            file = Path(name) if Path(name).is_absolute() else (path.parent / name).resolve()
            if not file.is_file():
                raise InputError(path, f"data_files {split}: no file {file}")
            resolved[split] = str(file)
            files[f"data_files.{split}"] = file
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return TaskSpec(str(config["task"]), config, files, TaskManager(include_defaults=False))


def fold_description(chat_history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The harness sends a task's `description` (e.g. MMLU's "The following are multiple
    choice questions ...") as a system message under a chat template; it is put at the start of
    the first user turn instead, so the system prompt stays the --persona / --system-prompt
    choice."""
    if not chat_history or chat_history[0]["role"] != "system":
        return chat_history
    description, rest = chat_history[0]["content"], [dict(m) for m in chat_history[1:]]
    first_user = next(i for i, m in enumerate(rest) if m["role"] == "user")
    rest[first_user]["content"] = description + rest[first_user]["content"]
    return rest


def _guarded_lm(model: Any, tokenizer: Any, system: SystemPrompt, report: TemplateReport, **kw):
    from lm_eval.models.huggingface import HFLM

    class GuardedHFLM(HFLM):
        """HFLM whose chat formatting is eval-capability's (template guard, system prompt)."""

        def apply_chat_template(
            self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
        ) -> str:
            return render(
                tokenizer,
                fold_description(chat_history),
                system,
                report,
                add_generation_prompt=add_generation_prompt,
            )

    return GuardedHFLM(pretrained=model, tokenizer=tokenizer, **kw)


def evaluate(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    system: SystemPrompt,
    report: TemplateReport,
    *,
    batch_size: int,
    limit: int | None,
    num_fewshot: int | None,
) -> dict[str, Any]:
    """The harness's `simple_evaluate` result (with `samples`) for `task` on `model`."""
    import lm_eval

    lm = _guarded_lm(model, tokenizer, system, report, batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task.config if task.config is not None else task.name],
        task_manager=task.manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=True,
        apply_chat_template=True,
        bootstrap_iters=0,
    )


def _doc_item(doc: dict[str, Any], doc_id: int, task: str, choices: list[str], gold: int):
    """The item a harness doc is: the built-in reader's when the doc has its layout (so the
    ids and item hash agree across backends), else one named TASK/DOC_ID."""
    if not row_problems(doc):
        return item_from_row(doc, doc_id + 1)
    labels = tuple(string.ascii_uppercase[: len(choices)])
    return MCItem(
        id=str(doc["id"]) if "id" in doc else f"{task}/{doc_id}",
        question=str(doc.get("question", "")),
        texts=tuple(choices),
        labels=labels,
        answer=labels[gold],
        subject=str(doc.get("subject", task)),
    )


def rows_of(result: dict[str, Any], tokenizer: Any) -> tuple[list[dict[str, Any]], list[MCItem]]:
    """eval-capability rows (and the items) from the harness's logged samples, task by task
    in name order, docs in doc_id order."""
    rows, items = [], []
    for task in sorted(result["samples"]):
        if result["configs"][task].get("output_type") != "multiple_choice":
            raise UserError(f"--task {task}: not a multiple_choice task")
        for s in sorted(result["samples"][task], key=lambda s: s["doc_id"]):
            choices = [arg[1] for arg in s["arguments"]]
            gold = s["target"]
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise UserError(
                    f"--task {task}: doc {s['doc_id']} has target {gold!r}, not one index"
                )
            if len(choices) > 26:
                raise UserError(
                    f"--task {task}: doc {s['doc_id']} has {len(choices)} choices (> 26)"
                )
            item = _doc_item(s["doc"], s["doc_id"], task, choices, gold)
            labels = list(string.ascii_uppercase[: len(choices)])
            lp = {lab: float(r[0]) for lab, r in zip(labels, s["filtered_resps"], strict=True)}
            predicted = max(lp, key=lp.__getitem__)
            prompt = s["arguments"][0][0]
            rows.append(
                {
                    "schema_version": ROW_SCHEMA_VERSION,
                    "id": item.id,
                    "question": item.question,
                    "labels": labels,
                    "label_logprobs": lp,
                    "predicted": predicted,
                    "answer": labels[gold],
                    "gold_index": gold,
                    "subject": item.subject if item.subject is not None else task,
                    "correct": predicted == labels[gold],
                    "n_prompt_tokens": len(tokenizer.encode(prompt, add_special_tokens=False)),
                    "task": task,
                    "doc_id": s["doc_id"],
                    "choices": choices,
                    "prompt": prompt,
                }
            )
            items.append(item)
    if not rows:
        raise UserError("--task: the harness returned no samples")
    return rows, items


def record(result: dict[str, Any], version: str, task: TaskSpec) -> dict[str, Any]:
    """The manifest's `lm_eval` entry: harness version, per task its config and hash, and one
    hash over the tasks' hashes (the guarded `capability_prompt_sha256`). A local task's data
    files are hashed by content, not by path, so a checkout elsewhere hashes the same."""
    import json

    by_path = {str(p): sha256_file(p) for k, p in task.files.items() if k.startswith("data_")}
    tasks = {}
    for name, config in sorted(result["configs"].items()):
        plain = json.loads(json.dumps(config, sort_keys=True, default=str))
        hashed = json.loads(json.dumps(plain))
        data_files = (hashed.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(data_files, dict):
            for split, path in data_files.items():
                data_files[split] = {"sha256": by_path.get(path, path)}
        tasks[name] = {
            "config_sha256": sha256_json(hashed),
            "config": plain,
            "num_fewshot": result["n-shot"].get(name),
            "version": result["versions"].get(name),
            "n_samples": len(result["samples"].get(name, [])),
        }
    combined = sha256_json({name: t["config_sha256"] for name, t in tasks.items()})
    return {"version": version, "config_sha256": combined, "tasks": tasks}
