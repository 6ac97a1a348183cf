"""eval-capability: multiple-choice accuracy of a model + adapter stack, optionally under a persona.

Two backends write the same rows (`capability.jsonl.gz`) and summary (`capability.summarize`):
`hf` (default, offline) scores the items of `--items` by the next-token log-probabilities of the
option letters (`persona_cli.capability`); `lm-eval` runs an lm-evaluation-harness task
(`--task`, `persona_cli.harness`) on the same model object with the same chat formatting. Every
check (items, persona, adapters, the harness and its task) runs in `_plan` before the run
directory opens, so a bad input leaves nothing behind; the manifest records the protocol
(`capability.protocol`: backend, item set, scorer) and, for lm-eval, the harness version and
each task's config and its hash.

    from persona_cli.eval.capability import CapabilityConfig, run_eval_capability
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_cli import adapters as adapters_lib
from persona_cli import bundled, capability, models, registry
from persona_cli import fields as common
from persona_cli.artifacts import read_json, write_json, write_jsonl
from persona_cli.chat_template import SystemPrompt, guard_record, inspect_template
from persona_cli.errors import UserError
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.rundir import RunDir, open_run

COMMAND = "eval-capability"
BACKENDS = ("hf", "lm-eval")
ROWS_FILE = "capability.jsonl.gz"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class CapabilityConfig:
    model: str = common.model()
    adapters: tuple[str, ...] = common.adapters()
    backend: str = field(
        default="hf",
        metadata={
            "help": "hf: option-letter log-probs over --items (offline); lm-eval: an "
            "lm-evaluation-harness --task (the lm-eval extra)."
        },
    )
    items: str | None = field(
        default=None,
        metadata={
            "help": "hf backend: JSONL in the allenai/ai2_arc or cais/mmlu layout (detected per "
            "file), or hf:NAME:CONFIG:SPLIT (default: data/mcq/mini_arc.jsonl; "
            "data/mcq/mini_mmlu.jsonl ships too)."
        },
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "lm-eval backend: a harness task or group name (mmlu_moral_scenarios) or a "
            "local task YAML (data/lm_eval/mini_mmlu.yaml ships)."
        },
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "lm-eval backend: few-shot examples (task default)."}
    )
    subjects: tuple[str, ...] | None = field(
        default=None, metadata={"help": "hf backend: subjects to keep (MMLU layout)."}
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "Score only the first N items (after --subjects; per harness task)."},
    )
    system_prompt: str = common.system_prompt()
    persona: str | None = field(
        default=None,
        metadata={"help": "Persona id: its registry system prompt is the system prompt."},
    )
    personas_file: str | None = common.personas_file()
    batch_size: int = field(default=16, metadata={"help": "Items per forward pass."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CapabilityResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False


@dataclass(frozen=True)
class _Plan:
    stack: list[adapters_lib.Adapter]
    system_prompt: str
    items: list[capability.MCItem] | None  # hf
    task: Any | None  # lm-eval: harness.TaskSpec
    harness_version: str | None
    inputs: dict[str, Path]


def _plan(cfg: CapabilityConfig) -> _Plan:
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend {cfg.backend!r}: choose {' or '.join(BACKENDS)}")
    system_prompt, inputs = cfg.system_prompt, {}
    if cfg.persona is not None:
        if cfg.system_prompt != "none":
            raise UserError("--persona and --system-prompt: give one of them")
        registry_file = Path(cfg.personas_file) if cfg.personas_file else bundled.personas_file()
        (chosen,) = registry.select_personas(
            registry.load_personas(registry_file), [cfg.persona], f"--persona ({registry_file})"
        )
        system_prompt, inputs["personas"] = chosen.system_prompt, registry_file
    items = task = version = None
    if cfg.backend == "hf":
        if cfg.task is not None or cfg.num_fewshot is not None:
            raise UserError("--task and --num-fewshot belong to --backend lm-eval")
        source = cfg.items or str(bundled.mcq_file())
        items = capability.load_items(source, cfg.limit, list(cfg.subjects or []) or None)
        if not source.startswith("hf:"):
            inputs["items"] = Path(source)
    else:
        from persona_cli import harness

        if cfg.items is not None or cfg.subjects:
            raise UserError("--items and --subjects belong to --backend hf; give --task")
        if cfg.task is None:
            raise UserError(f"--backend lm-eval needs --task (e.g. {harness.task_file()})")
        version = harness.require()
        task = harness.load_task(cfg.task)
        inputs |= task.files
    stack = adapters_lib.resolve_stack(list(cfg.adapters))
    return _Plan(stack, system_prompt, items, task, version, inputs)


def run_eval_capability(
    cfg: CapabilityConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> CapabilityResult:
    """Score, write rows and summary, finish the run (see the module docstring). `progress`
    gets the items the hf backend scores (the harness reports its own progress)."""
    plan = _plan(cfg)
    run = open_run(out, command=COMMAND, config=cfg.to_dict(), force=force)
    if run.done:
        return CapabilityResult(run, read_json(run.file(SUMMARY_FILE)), already_done=True)
    resolved = models.ensure_prepared(cfg.model)
    adapters_lib.check_stack(plan.stack, resolved)
    tok = models.load_tokenizer(resolved)
    net = adapters_lib.load_with_adapters(resolved, plan.stack, dtype=cfg.dtype)
    system = SystemPrompt.parse(plan.system_prompt)
    report = inspect_template(tok)
    extra: dict[str, Any] = {"adapters": adapters_lib.stack_record(plan.stack)}
    if plan.items is not None:
        progress.begin("", len(plan.items), unit="items")
        rows = capability.score_items(
            net,
            tok,
            plan.items,
            system,
            report,
            batch_size=cfg.batch_size,
            progress=lambda n: progress.advance("", n),
        )
        protocol = capability.protocol(plan.items, cfg.persona)
    else:
        from persona_cli import harness

        result = harness.evaluate(
            net,
            tok,
            plan.task,
            system,
            report,
            batch_size=cfg.batch_size,
            limit=cfg.limit,
            num_fewshot=cfg.num_fewshot,
        )
        rows, items = harness.rows_of(result, tok)
        extra["lm_eval"] = harness.record(result, plan.harness_version, plan.task)
        protocol = capability.protocol(
            items,
            cfg.persona,
            backend="lm-eval",
            scorer=harness.SCORER,
            prompt_hash=extra["lm_eval"]["config_sha256"],
            instruction=None,  # the task's doc_to_text is the prompt
            harness_version=plan.harness_version,
        )
    write_jsonl(run.file(ROWS_FILE), rows)
    summary = capability.summarize(rows)
    write_json(run.file(SUMMARY_FILE), summary)
    run.finish(
        inputs=plan.inputs,
        model=models.model_record(resolved, net),
        chat_template=guard_record(tok, system),
        protocol=protocol,
        extra=extra,
    )
    return CapabilityResult(run, summary)
