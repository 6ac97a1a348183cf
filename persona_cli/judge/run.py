"""`judge_align`: judge every answer of an input for each metric and write one run directory.

    persona-cli judge-align --input runs/eval_em/samples.jsonl.gz --backend openai \
        --judge-model gpt-4o-2024-08-06 --out runs/judge_em

RUN/
  config.json          the resolved JudgeConfig and the input path (the key's variable name only)
  judge_cache.sqlite   every judge reply obtained (chat_api cache; --cache puts it elsewhere)
  judgments.jsonl.gz   one row per (answer, metric): schemas.JUDGMENTS
  summary.json         means with intervals, EM rate, unscored shares, usage (judge/summary.py)
  manifest.json, DONE

Inputs are checked and the API key looked up before --out is created. An interrupted run
resumes: replies already obtained come from the cache, so no request is sent twice.
When the input is a generation run's samples.jsonl.gz, that run's protocol (sampling, question
set, chat template and system prompt, adapter stack) is carried into this manifest next to the
judge's, so `persona-cli compare` on judge runs guards the whole chain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_cli import models
from persona_cli.artifacts import read_json, sha256_file, sha256_json, write_json, write_jsonl
from persona_cli.chat_api import ChatResult, resolve_api_key, usage_by_model
from persona_cli.judge.config import JudgeConfig
from persona_cli.judge.inputs import SAMPLES_FILE, Columns, load_items, resolve_input
from persona_cli.judge.prompts import JudgePrompts, load_judge_prompts
from persona_cli.judge.remote import judge_remote
from persona_cli.judge.rows import judgment_row, request_id
from persona_cli.judge.summary import summarize
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.protocol import (
    RunProtocol,
    details,
    judge_protocol,
    method_protocol,
    run_fields,
)
from persona_cli.rundir import MANIFEST, open_run
from persona_cli.schemas import JUDGMENTS

log = logging.getLogger(__name__)

COMMAND = "judge-align"
JUDGMENTS_FILE = "judgments.jsonl.gz"
SUMMARY_FILE = "summary.json"
CACHE_FILE = "judge_cache.sqlite"


@dataclass(frozen=True)
class JudgeOutcome:
    run_dir: Path
    already_done: bool
    summary: dict[str, Any]
    requests_sent: int  # judge readings not served from the cache in this call


def judge_prompt_sha256(prompts: JudgePrompts, config: JudgeConfig) -> str:
    """`judge_prompt_sha256` of the protocol: every metric's template and the judge's system
    prompt choice, since both are part of what the judge reads."""
    return sha256_json({"templates": prompts.templates, "system_prompt": config.system.to_dict()})


def _upstream(source: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The manifest and guarded fields of the generation run whose samples are judged, when
    there is one."""
    manifest = source.parent / MANIFEST
    if source.name != SAMPLES_FILE or not manifest.is_file():
        return None
    doc = read_json(manifest)
    return doc, run_fields(source.parent, doc)


def _protocol(
    upstream_fields: dict[str, Any] | None, prompts: JudgePrompts, config: JudgeConfig
) -> RunProtocol:
    """The judge's own fields, plus the judged run's (sampling, question set): two judge runs
    over differently sampled answers differ in protocol."""
    own = judge_protocol(
        judge_model=config.model,
        judge_prompt_sha256=judge_prompt_sha256(prompts, config),
        judge_backend=config.backend,
        judge_scoring=config.scoring,
        judge_min_number_mass=config.min_number_mass,
    ) | details(top_logprobs=config.top_logprobs, parsed_max_tokens=config.parsed_max_tokens)
    return own if upstream_fields is None else method_protocol(**upstream_fields) | own


def _usage(results: list[ChatResult], config: JudgeConfig) -> dict[str, Any]:
    clients = [config.client_config()] if config.backend != "local" else []
    return {
        "by_model": {m: u.to_dict() for m, u in usage_by_model(results, clients).items()},
        "this_run": {
            m: u.to_dict()
            for m, u in usage_by_model(results, clients, include_cached=False).items()
        },
    }


def judge_align(
    config: JudgeConfig,
    input_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> JudgeOutcome:
    """Judge `input_path` into the run directory `out` (see the module docstring)."""
    config = config.resolved()
    prompts = load_judge_prompts(config.judge_prompts).select(config.metrics)
    source = resolve_input(input_path)
    columns = Columns(config.question_column, config.answer_column, config.id_column)
    items = load_items(source, columns)
    # A missing key or model fails before --out exists, so the corrected command is not refused
    # as "an unfinished run with a different config".
    if config.backend == "local":
        models.ensure_prepared(config.model)
    else:
        resolve_api_key(config.client_config())
    run = open_run(
        out, command=COMMAND, config={**config.to_dict(), "input": str(source)}, force=force
    )
    if run.done:
        return JudgeOutcome(run.path, True, read_json(run.file(SUMMARY_FILE)), 0)

    cache_path = Path(config.cache) if config.cache else run.file(CACHE_FILE)
    plan = [(item, metric) for item in items for metric in config.metrics]
    pairs = [(request_id(i, m), prompts.render(m, i.question, i.answer)) for i, m in plan]
    progress.begin("", len(pairs), unit="readings")

    def report(done: int, total: int) -> None:
        progress.update("", done)

    extra: dict[str, Any] = {}
    if config.backend == "local":
        from persona_cli.judge.local import LocalJudge  # torch only when judging locally

        judge = LocalJudge(config)
        results = judge.results(pairs, cache_path, report)
        model_record = judge.model_record()
        extra["judge_chat_template"] = judge.chat_template_record()
        extra["number_vocab"] = {
            "values": judge.number_values,
            "n_tokens": len(judge.number_ids),
        }
    else:
        results = judge_remote(pairs, config, cache_path, report)
        model_record = {
            "backend": config.backend,
            "model": config.model,
            "base_url": config.base_url,
            "response_models": sorted({r.response_model for r in results if r.response_model}),
        }

    template_sha = {m: prompts.template_sha256(m) for m in config.metrics}
    rows = [
        judgment_row(item, metric, template_sha[metric], result, config)
        for (item, metric), result in zip(plan, results, strict=True)
    ]
    write_jsonl(run.file(JUDGMENTS_FILE), rows, schema_version=JUDGMENTS.version)
    prompt_sha = judge_prompt_sha256(prompts, config)
    summary = summarize(rows, config, prompt_sha256=prompt_sha, usage=_usage(results, config))
    write_json(run.file(SUMMARY_FILE), summary)

    found = _upstream(source)
    upstream, upstream_fields = found if found is not None else (None, None)
    if upstream is not None:
        extra["upstream"] = {
            "run_dir": str(source.parent.resolve()),
            "run_id": upstream["run_id"],
            "command": upstream["command"],
            "manifest_sha256": sha256_file(source.parent / MANIFEST),
        }
        if upstream.get("adapters"):
            extra["adapters"] = upstream["adapters"]  # protocol_of follows the training stack
    run.finish(
        inputs={"input": source, "judge_prompts": prompts.path},
        model=model_record,
        # The judged answers' template and system prompt (guarded by compare), not the judge's.
        chat_template=upstream["chat_template"] if upstream is not None else None,
        protocol=_protocol(upstream_fields, prompts, config),
        extra=extra,
    )
    sent = sum(1 for r in results if not r.from_cache)
    log.info(
        "%d judgments (%d unscored), %d readings obtained now, %d from the cache",
        len(rows),
        sum(1 for r in rows if r["score"] is None),
        sent,
        len(results) - sent,
    )
    return JudgeOutcome(run.path, False, summary, sent)
