"""Getting every answerer's answer to every prompt, resumably and within a budget.

Local answerers generate with `persona_cli.generate.generate_hf` (greedy unless a temperature is
set) and their answers are saved as a shard `answers/<role>_<name>.jsonl.gz` once complete, so a
re-run skips them. Endpoint answerers go through `persona_cli.chat_api`, whose cache in the run
directory means a re-run (or a run after kill -9) sends no request that already succeeded. Under
`--budget-usd`, requests go out in chunks and a chunk whose estimated cost (prompt characters / 3
tokens at the prompt price, plus max_tokens at the completion price) would pass the budget is not
sent: its rows are recorded with status "budget". A teacher that trips the failure-rate guard, or
fails every call, is recorded with its reasons and the run goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_cli.artifacts import read_jsonl, write_jsonl
from persona_cli.trace.prompts import TracePrompt
from persona_cli.trace.roster import Answerer

log = logging.getLogger(__name__)
CACHE = "chat_cache.sqlite"
Progress = Callable[[int], None]


@dataclass
class Spend:
    budget_usd: float | None
    spent_usd: float = 0.0  # paid in this run (cache hits are free now)
    stopped: bool = False

    def allows(self, estimate: float) -> bool:
        if self.budget_usd is None:
            return True
        if self.spent_usd + estimate > self.budget_usd:
            self.stopped = True
        return not self.stopped


@dataclass
class LocalModels:
    """Loaded (model, tokenizer) per (spec, adapter): three personas of one base load it once."""

    loaded: dict[tuple[str, str | None], tuple[Any, Any]] = field(default_factory=dict)

    def get(self, spec: str, adapter: str | None) -> tuple[Any, Any]:
        from persona_cli import adapters, models

        key = (spec, adapter)
        if key not in self.loaded:
            resolved = models.ensure_prepared(spec)
            stack = adapters.resolve_stack([adapter] if adapter else [])
            self.loaded[key] = (
                adapters.load_with_adapters(resolved, stack),
                models.load_tokenizer(resolved),
            )
        return self.loaded[key]


def _row(p: TracePrompt, **kw: Any) -> dict[str, Any]:
    base = {
        "prompt_id": p.id,
        "raw": None,
        "status": "ok",
        "reason": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "cost_usd": None,
        "cached": False,
    }
    return {**base, **kw}


def system_text(a: Answerer, prompt: TracePrompt, personas: dict[str, Any]) -> str | None:
    """The answerer's own system prompt; else the prompt's persona (students under a persona)."""
    if a.system_prompt:
        return a.system_prompt
    persona = a.persona or prompt.persona
    return personas[persona].system_prompt if persona else None


def answer_local(
    a: Answerer,
    prompts: list[TracePrompt],
    personas: dict[str, Any],
    models: LocalModels,
    seed: int,
    progress: Progress | None,
) -> list[dict]:
    from persona_cli.chat_template import SystemPrompt, inspect_template, render
    from persona_cli.generate import GenerationConfig, generate_hf

    model, tok = models.get(a.model, a.adapter)
    report = inspect_template(tok)
    rendered = []
    for p in prompts:
        system = system_text(a, p, personas)
        choice = SystemPrompt.parse(system) if system else SystemPrompt.parse("none")
        rendered.append(
            render(
                tok,
                [{"role": "user", "content": p.text}],
                choice,
                report,
                add_generation_prompt=True,
            )
        )
    cfg = GenerationConfig(max_new_tokens=a.max_tokens, temperature=a.temperature, seed=seed)
    done = generate_hf(model, tok, rendered, cfg, progress=progress)
    return [
        _row(
            p,
            raw=c.text,
            completion_tokens=c.n_tokens,
            cost_usd=0.0,
            prompt_tokens=len(tok(r, add_special_tokens=False)["input_ids"]),
        )
        for p, r, c in zip(prompts, rendered, done, strict=True)
    ]


def _estimate(a: Answerer, chunk: list[TracePrompt]) -> float:
    pp, cp = a.prompt_price_per_1m or 0.0, a.completion_price_per_1m or 0.0
    return sum(len(p.text) / 3 * pp + a.max_tokens * cp for p in chunk) / 1e6


def answer_endpoint(
    a: Answerer,
    prompts: list[TracePrompt],
    personas: dict[str, Any],
    run_dir: Path,
    spend: Spend,
    options: dict[str, Any],
    progress: Progress | None,
) -> list[dict]:
    from persona_cli.chat_api import ChatRequest, ClientConfig, FailureRateExceeded, run_requests

    config = ClientConfig(
        provider=a.provider,
        model=a.model,
        base_url=a.base_url or "",
        api_key_env=a.api_key_env,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        prompt_price_per_1m=a.prompt_price_per_1m,
        completion_price_per_1m=a.completion_price_per_1m,
        **options["client"],
    )
    rows: list[dict] = []
    chunk_size = options["chunk"]
    for start in range(0, len(prompts), chunk_size):
        chunk = prompts[start : start + chunk_size]
        if not spend.allows(_estimate(a, chunk)):
            rows += [_row(p, status="budget", reason="budget_exhausted") for p in prompts[start:]]
            break
        requests = []
        for p in chunk:
            system = system_text(a, p, personas)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p.text}
            ]
            requests.append(ChatRequest(id=f"{a.name}/{p.id}", messages=messages))
        try:
            results = run_requests(requests, config, run_dir / CACHE)
        except FailureRateExceeded as e:
            log.warning("teacher %s stopped: %s", a.name, e)
            results = e.results
        for p, r in zip(chunk, results, strict=True):
            cost = None
            if r.ok and (
                a.prompt_price_per_1m is not None or a.completion_price_per_1m is not None
            ):
                cost = (
                    (r.prompt_tokens or 0) * (a.prompt_price_per_1m or 0)
                    + (r.completion_tokens or 0) * (a.completion_price_per_1m or 0)
                ) / 1e6
                if not r.from_cache:
                    spend.spent_usd += cost
            rows.append(
                _row(
                    p,
                    raw=r.content if r.ok else None,
                    status="ok" if r.ok else "failed",
                    reason=r.reason,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    cost_usd=cost,
                    cached=r.from_cache,
                )
            )
        if progress is not None:
            progress(len(chunk))
    return rows


def answers(
    a: Answerer,
    role: str,
    prompts: list[TracePrompt],
    run_dir: Path,
    personas: dict[str, Any],
    models: LocalModels,
    spend: Spend,
    options: dict[str, Any],
    progress: Progress | None = None,
) -> list[dict]:
    shard = run_dir / "answers" / f"{role}_{a.name}.jsonl.gz"
    if shard.exists():  # written whole, atomically: a complete earlier answer set
        if progress is not None:
            progress(len(prompts))
        return read_jsonl(shard)
    if a.provider == "local":
        rows = answer_local(a, prompts, personas, models, options["seed"], progress)
        write_jsonl(shard, rows, schema_version=1)
        return rows
    return answer_endpoint(a, prompts, personas, run_dir, spend, options, progress)
