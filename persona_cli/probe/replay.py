"""`probe replay`: replay a teacher pool step by step against v_hack, optionally projected.

    persona-cli probe replay --pool runs/pool --vhack runs/vhack --out runs/replay_vanilla
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --projected --out runs/replay_proj
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --loss grpo --out runs/replay_grpo

The adapter is the one v_hack was extracted on (kind, rank, targets, layers and init seed come
from v_hack's metadata, on the same model). For each pool step, at the adapter's current weights:

1. every row's gradient g_i of its mean completion NLL (persona_cli.probe.grads) and its cosines
   with v_hack, `cos` and `cos_weighted` (persona_cli.probe.geometry);
2. its update contribution u_i = A_i g_i: A_i = 1 under `--loss nll` (SFT on the pool), or
   the Dr.GRPO advantage A_i = r_i - mean(r of the rows of the same problem in this step), no
   std normalisation, under `--loss grpo`;
3. with `--projected`, per module, u_i,m minus its v_hack component (where the rule fires);
   per module cos_in = cos(u_i,m, v_m), cos_out after projection, `fired`;
4. one optimizer step (SGD or AdamW, `--lr`) on the mean of the u_i over rows with a gradient.

Rows with an empty completion (or none left after truncation) get null cosines and a `reason`;
zero-advantage rows keep their cosine, do not enter the update, and say so. With old logprobs
in the pool rows, importance ratios exp(log p_now - log p_old) per token are recorded.

Every step writes `step_NNNNNN.jsonl.gz` (rows: persona_cli.schemas.PROBE_STEP) atomically,
after `checkpoints/after_step_NNNNNN.safetensors` (adapter and optimizer state). A killed replay
resumes at the first missing step file from the checkpoint before it, so it ends with the same
rows and weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch

from persona_cli.artifacts import (
    iter_jsonl,
    read_json,
    sha256_file,
    write_bytes_atomic,
    write_json,
    write_jsonl,
)
from persona_cli.chat_template import inspect_template
from persona_cli.errors import UserError
from persona_cli.manifest import BatchProtocol
from persona_cli.models import model_record, resolve
from persona_cli.probe.adapters import ProbeAdapter, load_adapted
from persona_cli.probe.config import (
    AdapterConfig,
    ReplayConfig,
    ReplayJob,
    probe_adapter_protocol,
    to_dict,
)
from persona_cli.probe.encoding import encode
from persona_cli.probe.geometry import cosines, project
from persona_cli.probe.grads import per_sample_grads
from persona_cli.probe.pool import SourceRow, read_pool, step_name
from persona_cli.probe.steps import finite_or_none, step_stats
from persona_cli.probe.vhack import check_layout, check_model, load_vhack, vhack_path
from persona_cli.progress import NO_PROGRESS, Progress
from persona_cli.protocol import details, method_protocol, training_protocol
from persona_cli.rundir import RunDir, open_run
from persona_cli.schemas import PROBE_STEP, REPLAY_SUMMARY

log = logging.getLogger(__name__)

COMMAND = "probe replay"
SUMMARY_VERSION = REPLAY_SUMMARY.version
CHECKPOINTS = "checkpoints"
RATIO_CLIP = 0.2  # PPO's usual epsilon: a token ratio outside [0.8, 1.2] counts as clipped


@dataclass
class ReplayResult:
    run: RunDir
    summary: dict[str, Any]
    already_done: bool = False  # finished before this call; nothing was recomputed


def _optimizer(params: list[torch.nn.Parameter], config: ReplayConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr)


def advantages(rows: list[SourceRow], loss: str) -> list[float]:
    """1 per row for `nll`; Dr.GRPO r - mean(r of the problem's rows in this step) for `grpo`."""
    if loss == "nll":
        return [1.0] * len(rows)
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[r.problem_id].append(r.reward)
    means = {pid: sum(rs) / len(rs) for pid, rs in groups.items()}
    return [r.reward - means[r.problem_id] for r in rows]


def _ratios(new: torch.Tensor, old: tuple[float, ...] | None) -> tuple[dict[str, Any], str | None]:
    if old is None:
        return {}, None
    if len(old) != new.numel():
        return {"ratio_mean": None}, f"old_logprobs has {len(old)} values for {new.numel()} tokens"
    ratio = torch.exp(new.double() - torch.tensor(old, dtype=torch.float64))
    return {
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "ratio_frac_clipped": float(((ratio - 1).abs() > RATIO_CLIP).double().mean()),
        "seq_log_ratio": float(torch.log(ratio).sum()),
    }, None


def replay_step(
    adapter: ProbeAdapter,
    v: torch.Tensor,
    tokenizer: Any,
    rows: list[SourceRow],
    config: ReplayConfig,
) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
    """Rows for one pool step and the (projected) update gradient (None: nothing to update)."""
    adv = advantages(rows, config.loss)
    encoded = [
        encode(tokenizer, r.prompt, r.completion, max_length=config.max_length) for r in rows
    ]
    live = [
        i
        for i, (r, e) in enumerate(zip(rows, encoded, strict=True))
        if r.completion.strip() and e.n_completion > 0
    ]
    got = per_sample_grads(
        adapter,
        [encoded[i] for i in live],
        tokenizer.pad_token_id,
        method=config.grad_method,
        batch_size=config.batch_size,
    )
    cos, cos_w = cosines(got.grads, v, adapter)
    weights = torch.tensor([adv[i] for i in live], dtype=torch.float32)
    proj = project(
        got.grads * weights[:, None],
        v,
        adapter,
        when=config.project_when if config.projected else None,
    )
    out: list[dict[str, Any]] = []
    slot = {i: k for k, i in enumerate(live)}
    none_map = {m: None for m in adapter.modules}
    for i, (r, e) in enumerate(zip(rows, encoded, strict=True)):
        row: dict[str, Any] = {
            "step": r.step,
            "sample_index": r.sample_index,
            "stage": "replay",
            "problem_id": r.problem_id,
            "hacked": r.hacked,
            "gt_pass": r.gt_pass,
            "reward": r.reward,
            "advantage": adv[i],
            "n_completion_tokens": e.n_completion,
            "truncated": e.truncated,
        }
        if i not in slot:
            reason = "empty_completion" if not r.completion.strip() else "no_completion_tokens_left"
            row.update(
                nll=None,
                cos=None,
                cos_weighted=None,
                cos_in=none_map,
                cos_out=none_map,
                fired={m: False for m in adapter.modules},
                frac_fired=None,
                in_update=False,
                reason=reason,
            )
            out.append(row)
            continue
        k = slot[i]
        c_in = {
            m: finite_or_none(float(x))
            for m, x in zip(adapter.modules, proj.cos_in[k], strict=True)
        }
        c_out = {
            m: finite_or_none(float(x))
            for m, x in zip(adapter.modules, proj.cos_out[k], strict=True)
        }
        fired = {m: bool(x) for m, x in zip(adapter.modules, proj.fired[k], strict=True)}
        defined = sum(c is not None for c in c_in.values())
        reasons = []
        if math.isnan(float(cos[k])):
            reasons.append("zero_gradient")
        if adv[i] == 0.0:
            reasons.append("zero_advantage")
        ratio_fields, ratio_reason = _ratios(got.token_logprobs[k], r.old_logprobs)
        if ratio_reason:
            reasons.append(ratio_reason)
        row.update(
            nll=float(got.nll[k]),
            cos=finite_or_none(float(cos[k])),
            cos_weighted=finite_or_none(float(cos_w[k])),
            cos_in=c_in,
            cos_out=c_out,
            fired=fired,
            frac_fired=sum(fired.values()) / defined if defined else None,
            in_update=adv[i] != 0.0,
            reason="; ".join(reasons) or None,
            **ratio_fields,
        )
        out.append(row)
    if not live:
        return out, None
    return out, proj.grads.sum(0) / len(live)


def _save_checkpoint(
    path: Path, adapter: ProbeAdapter, opt: torch.optim.Optimizer, step: int
) -> None:
    from safetensors.torch import save

    state = opt.state_dict()
    tensors = {f"adapter/{k}": t for k, t in adapter.state().items()}
    scalars: dict[str, Any] = {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt/{idx}/{name}"] = value.detach().clone()
            else:
                scalars[f"{idx}/{name}"] = value
    meta = {"step": step, "param_groups": state["param_groups"], "scalars": scalars}
    write_bytes_atomic(path, save(tensors, metadata={"persona_cli": orjson.dumps(meta).decode()}))


def _load_checkpoint(path: Path, adapter: ProbeAdapter, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = orjson.loads(f.metadata()["persona_cli"])
    tensors = load_file(str(path))
    adapter.load_state(
        {k.removeprefix("adapter/"): t for k, t in tensors.items() if k.startswith("adapter/")}
    )
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, t in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state[int(idx)][name] = t
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state[int(idx)][name] = value
    opt.load_state_dict({"state": dict(state), "param_groups": meta["param_groups"]})


def _checkpoint(run: RunDir, step: int) -> Path:
    return run.file(CHECKPOINTS) / f"after_step_{step:06d}.safetensors"


def replay(
    job: ReplayJob,
    out: str | Path,
    *,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> ReplayResult:
    config = job.replay.check()
    pool, vhack, model = Path(job.pool), Path(job.vhack), job.model
    tensors, meta = load_vhack(vhack)
    resolved = resolve(model or meta["model"]["spec"])
    check_model(meta, resolved, vhack)
    steps = read_pool(pool)
    order = list(steps)[: config.max_steps] if config.max_steps else list(steps)
    run = open_run(
        out,
        command=COMMAND,
        config={
            **to_dict(config),
            "model": resolved.spec,
            "pool": str(pool),
            "vhack": str(vhack),
            "vhack_sha256": sha256_file(vhack_path(vhack)),
        },
        force=force,
    )
    if run.done:
        return ReplayResult(run, read_json(run.file("summary.json")), already_done=True)
    a = meta["adapter"]
    adapter_cfg = AdapterConfig(
        kind=a["kind"],
        rank=a["rank"],
        alpha=a["alpha"] if a["alpha"] is not None else AdapterConfig().alpha,
        targets=tuple(a["targets"]),
        layers=tuple(a["layers"]),
        seed=a["seed"],
    )
    tokenizer, adapter = load_adapted(resolved, adapter_cfg, dtype=meta["dtype"])
    check_layout(tensors, adapter, vhack)
    v = adapter.join(tensors).float()
    opt = _optimizer(adapter.parameters(), config)
    init = run.file("adapter_init.safetensors")
    if not init.exists():
        _save_adapter(init, adapter)

    first = next(
        (k for k, s in enumerate(order) if not run.file(step_name(s)).exists()), len(order)
    )
    if first > 0:
        ckpt = _checkpoint(run, order[first - 1])
        if not ckpt.is_file():
            raise UserError(
                f"--out {run.path}: {ckpt.name} is missing, cannot resume; pass --force"
            )
        _load_checkpoint(ckpt, adapter, opt)
        log.info(
            "resuming at pool step %d (%d of %d done)",
            order[first] if first < len(order) else -1,
            first,
            len(order),
        )
    progress.begin("", len(order), done=first, unit="steps")
    for k in range(first, len(order)):
        step = order[k]
        rows, update = replay_step(adapter, v, tokenizer, steps[step], config)
        if update is not None:
            for p, g in zip(adapter.parameters(), adapter.split(update).values(), strict=True):
                p.grad = g.to(p.dtype).to(p.device)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _save_checkpoint(_checkpoint(run, step), adapter, opt, step)
        write_jsonl(run.file(step_name(step)), rows, schema_version=PROBE_STEP.version)
        if k >= 1:  # a resume needs only the checkpoint after the newest step file
            _checkpoint(run, order[k - 1]).unlink(missing_ok=True)
        progress.update("", k + 1)
    _save_adapter(run.file("adapter_final.safetensors"), adapter)
    per_step = [
        step_stats(list(iter_jsonl(run.file(step_name(s)), PROBE_STEP.check))) for s in order
    ]
    summary = {
        "schema_version": SUMMARY_VERSION,
        "loss": config.loss,
        "projected": config.projected,
        "project_when": config.project_when if config.projected else None,
        "steps": per_step,
        "rows": sum(s["rows"] for s in per_step),
        "null_cos": sum(s["null_cos"] for s in per_step),
        "adapter": adapter.record(),
    }
    write_json(run.file("summary.json"), summary)
    run.finish(
        inputs={
            "vhack": vhack_path(vhack),
            **{f"pool:{step_name(s)}": steps[s][0].file for s in order if steps[s]},
        },
        model=model_record(resolved),
        chat_template=inspect_template(tokenizer).to_dict(),
        protocol=training_protocol(
            BatchProtocol(config.batch_size, 1, 1, optimizer_steps=len(order)), config.lr
        )
        | probe_adapter_protocol(adapter_cfg)
        | method_protocol(
            replay_loss=config.loss,
            projection=config.project_when if config.projected else "off",
        )
        | details(optimizer=config.optimizer, weight_decay=config.weight_decay),
        seeds=[adapter_cfg.seed],
    )
    return ReplayResult(run, summary)


def _save_adapter(path: Path, adapter: ProbeAdapter) -> None:
    from safetensors.torch import save

    write_bytes_atomic(path, save(adapter.state()))
