"""`extract-vhack`: the per-module gradient direction that separates hack from clean completions.

    persona-cli extract-vhack --pool runs/pool --model smollm2-135m --adapter lora --rank 8 \\
        --loss nll --out runs/vhack

With g_i the gradient of sample i's mean completion NLL over the probe adapter's tensors
(persona_cli.probe.grads), H the hack rows and C the clean rows:

- `--loss nll`:          v_hack = mean_{i in H} g_i - mean_{i in C} g_i   (class-balanced)
- `--loss contrastive`:  v_hack = grad of (1/N) sum_i A_i NLL_i = (1/N) sum_i A_i g_i,
  A_i = +1 for hack and -1 for clean, N = |H| + |C|: the policy-gradient loss whose descent
  makes hacks likelier, so classes weigh by their frequency.

Either way v_hack is a gradient (ascent on NLL(hack) relative to NLL(clean)): an update whose
gradient has a positive cosine with it pushes toward hacking. Rows with an empty completion are
skipped and listed with the reason. Outputs: `v_hack.safetensors` (one tensor per adapter
tensor, metadata in persona_cli.probe.vhack), `rows.jsonl.gz` (every source row: used or why
not, its NLL), `summary.json`, then the manifest (input files hashed) and DONE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persona_cli.artifacts import read_json, sha256_json, write_json, write_jsonl
from persona_cli.chat_template import inspect_template
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.models import model_record, resolve
from persona_cli.probe.adapters import load_adapted
from persona_cli.probe.config import ExtractJob, probe_adapter_protocol, to_dict
from persona_cli.probe.encoding import encode
from persona_cli.probe.geometry import module_sums
from persona_cli.probe.grads import per_sample_grads
from persona_cli.probe.pool import SourceRow, read_pairs, read_pool, source_hashes
from persona_cli.probe.vhack import FILENAME, save_vhack
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.protocol import batch_protocol, method_protocol
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import VHACK_SUMMARY

log = logging.getLogger(__name__)

COMMAND = "extract-vhack"
SUMMARY_VERSION = VHACK_SUMMARY.version


@dataclass
class ExtractResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False  # finished before this call; nothing was recomputed


def load_source(pool: Path | None, pairs: Path | None) -> tuple[list[SourceRow], Path]:
    if (pool is None) == (pairs is None):
        raise UserError("extract-vhack: pass exactly one of --pool DIR and --pairs FILE")
    if pool is not None:
        return [r for rows in read_pool(pool).values() for r in rows], pool
    assert pairs is not None
    return read_pairs(pairs), pairs


def _row_record(r: SourceRow, used: bool, reason: str | None, nll: float | None) -> dict[str, Any]:
    return {
        "file": r.file,
        "line": r.line,
        "step": r.step,
        "sample_index": r.sample_index,
        "problem_id": r.problem_id,
        "hacked": r.hacked,
        "gt_pass": r.gt_pass,
        "used": used,
        "reason": reason,
        "nll": nll,
    }


def extract_vhack(
    job: ExtractJob,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ExtractResult:
    config = job.extract.check()
    pool = Path(job.pool) if job.pool else None
    pairs = Path(job.pairs) if job.pairs else None
    rows, source = load_source(pool, pairs)
    usable = [r for r in rows if r.completion.strip()]
    if not any(r.hacked for r in usable):
        raise UserError(
            f"{source}: no hack rows (hacked=true, non-empty completion) to extract from"
        )
    if not any(not r.hacked for r in usable):
        raise UserError(
            f"{source}: no clean rows (hacked=false, non-empty completion) to contrast with"
        )
    model = resolve(config.model)
    run = open_run(
        out,
        command=COMMAND,
        config={
            **to_dict(config),
            "source": str(source),
            "source_kind": "pool" if pool else "pairs",
        },
        force=force,
    )
    if run.done:
        return ExtractResult(run, read_json(run.file("summary.json")), already_done=True)
    tokenizer, adapter = load_adapted(model, config.adapter, dtype=config.dtype)

    records: list[dict[str, Any]] = []
    sums = {
        True: torch.zeros(adapter.size, dtype=torch.float64),
        False: torch.zeros(adapter.size, dtype=torch.float64),
    }
    counts = {True: 0, False: 0}
    nll_sums = {True: 0.0, False: 0.0}
    todo = []
    for r in rows:
        enc = encode(tokenizer, r.prompt, r.completion, max_length=config.max_length)
        if not r.completion.strip() or enc.n_completion == 0:
            reason = "empty_completion" if not r.completion.strip() else "no_completion_tokens_left"
            records.append(_row_record(r, False, reason, None))
        else:
            todo.append((r, enc))
    progress.begin("", len(todo), unit="rows")
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start : start + config.batch_size]
        got = per_sample_grads(
            adapter, [e for _, e in chunk], tokenizer.pad_token_id, batch_size=config.batch_size
        )
        for (r, _), g, nll in zip(chunk, got.grads, got.nll, strict=True):
            sums[r.hacked] += g.double()
            counts[r.hacked] += 1
            nll_sums[r.hacked] += float(nll)
            records.append(_row_record(r, True, None, float(nll)))
        progress.advance("", len(chunk))

    n_hack, n_clean = counts[True], counts[False]
    if config.loss == "nll":
        v = sums[True] / n_hack - sums[False] / n_clean
    else:
        v = (sums[True] - sums[False]) / (n_hack + n_clean)
    v = v.float()
    module_norms = module_sums((v * v)[None], adapter)[0].sqrt()
    used_rows = [
        (rec["file"], rec["line"], rec["sample_index"], rec["hacked"])
        for rec in records
        if rec["used"]
    ]
    summary = {
        "schema_version": SUMMARY_VERSION,
        "loss": config.loss,
        "counts": {"hack": n_hack, "clean": n_clean, "skipped": len(records) - n_hack - n_clean},
        "mean_nll": {"hack": nll_sums[True] / n_hack, "clean": nll_sums[False] / n_clean},
        "norm": float(v.norm()),
        "module_norms": {m: float(n) for m, n in zip(adapter.modules, module_norms, strict=True)},
        "adapter": adapter.record(),
    }
    meta = {
        "model": model.to_dict(),
        "adapter": adapter.record(),
        "loss": config.loss,
        "counts": summary["counts"],
        "sources": source_hashes(rows),
        "rows_sha256": sha256_json(used_rows),
        "norm": summary["norm"],
        "module_norms": summary["module_norms"],
        "max_length": config.max_length,
        "dtype": config.dtype,
    }
    if summary["norm"] == 0.0:
        log.warning("v_hack is exactly zero: hack and clean gradients coincide")
    write_jsonl(run.file("rows.jsonl.gz"), records, schema_version=1)
    save_vhack(run.file(FILENAME), adapter.split(v), meta)
    write_json(run.file("summary.json"), summary)
    run.finish(
        inputs={f"source:{Path(f).name}": f for f in meta["sources"]},
        model=model_record(model),
        chat_template=inspect_template(tokenizer).to_dict(),
        protocol=batch_protocol(BatchProtocol(config.batch_size, 1, 1, optimizer_steps=0))
        | probe_adapter_protocol(config.adapter)
        | method_protocol(vhack_loss=config.loss),
        seeds=[config.adapter.seed],
    )
    return ExtractResult(run, summary)
