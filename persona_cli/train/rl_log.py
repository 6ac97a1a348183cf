"""Per-step artifacts of an RL run (train-grpo, train-sdpo): the two step logs and the rollouts.

- `rl_log.jsonl.gz`: one `RL_LOG` row per optimizer step: loss and each term of it (GRPO, SDPO,
  DPO), lr, grad norm, reward mean and std over the step's completions, the fraction of groups
  whose rewards were all equal (no signal), completion length and clipping, entropy, the KL
  terms; under `--vhack` the projection's cosines (`persona_cli.train.projection`); with
  `--generator` the importance-ratio statistics (`persona_cli.train.mixed`); with the sandbox
  reward the labels of the step's completions (`label_stats`: hack rate strict and loose, gt
  pass rate, over all completions and over the policy's own). Derived from the Trainer's
  `log_history`, which checkpoints store, and from the step files, so a resumed run's log is
  whole.
- `train_log.jsonl.gz`: the same steps in the train-sft schema (`schemas.TRAIN_LOG`).
- `step_NNNNNN.jsonl.gz`: every completion sampled for optimizer step N with its prompt, token
  ids, reward, advantage, group, which policy wrote it and the reward's details (generic
  `schemas.STEP` rows), written by `RolloutWriter`, the trainer's `on_rollouts` hook. A group
  whose rewards are all equal has advantage 0: its rows stay, with `zero_advantage_reason`.

    rows = rl_log_rows(trainer.state.log_history)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from persona_cli.artifacts import read_jsonl, write_jsonl
from persona_cli.probe.pool import step_name
from persona_cli.schemas import STEP, TRAIN_LOG, Field, RowSchema
from persona_cli.train.rewards import MCReward, UnitTestReward

RL_LOG_NAME = "rl_log.jsonl.gz"


def _finite(v: Any) -> float | None:
    return None if v is None or v != v else float(v)  # NaN (v != v) -> null


_SAMPLED = "null on a step that trained on the previous step's samples (--num-iterations > 1)"
_NUM = (float, int)


def _opt(name: str, types: tuple[type, ...], doc: str) -> Field:
    return Field(name, types, required=False, nullable=True, doc=doc)


# Optional fields: absent in logs written before they existed, null where they do not apply.
_EXTRA_FIELDS = (
    _opt("grpo_loss", _NUM, "the GRPO term (unweighted); null when its weight is 0"),
    _opt("dpo_loss", _NUM, "the DPO term on --dpo-pairs (unweighted); null without it"),
    _opt("dpo_pairs", (list,), "indices of the DPO pairs the step used"),
    _opt("proj_cos_in", _NUM, "--vhack: mean over modules of cos(update_m, v_m) before"),
    _opt("proj_cos_out", _NUM, "--vhack: the same after the projection"),
    _opt("proj_frac_fired", _NUM, "--vhack: modules projected / modules with a cosine"),
    _opt("proj_max_cos_out_fired", _NUM, "--vhack: largest cos_out of a projected module"),
    _opt("projection", (dict,), "--vhack: module -> [cos_in, cos_out, fired]"),
    _opt("ratio_mean", _NUM, "--generator: mean importance ratio pi/mu over their tokens"),
    _opt("ratio_min", _NUM, "--generator"),
    _opt("ratio_max", _NUM, "--generator"),
    _opt("ratio_clip_frac", _NUM, "--generator: tokens with ratio outside 1 +- epsilon"),
    _opt("ratio_hist", (list,), "--generator: fraction of tokens per log-ratio bin (mixed.py)"),
    _opt("ratio_tokens", (int,), "--generator: tokens the ratio statistics are over"),
    _opt("completions", (int,), "completions the step sampled"),
    _opt("policy_completions", (int,), "of them written by the policy itself"),
    _opt("hack_rate_strict", _NUM, "sandbox: category_strict == hack, all completions"),
    _opt("hack_rate_loose", _NUM, "sandbox: category_loose == hack, all completions"),
    _opt("gt_pass_rate", _NUM, "sandbox: passes the hidden tests, all completions"),
    _opt("policy_hack_rate_strict", _NUM, "sandbox: the policy's own completions"),
    _opt("policy_hack_rate_loose", _NUM, "sandbox: the policy's own completions"),
    _opt("policy_gt_pass_rate", _NUM, "sandbox: the policy's own completions"),
    _opt("policy_hacks_strict", (int,), "sandbox: count behind policy_hack_rate_strict"),
    _opt("policy_hacks_loose", (int,), "sandbox: count behind policy_hack_rate_loose"),
    _opt("zero_advantage_groups", (int,), "groups whose rewards were all equal (kept)"),
    _opt("groups", (int,), "groups the step sampled"),
)

RL_LOG = RowSchema(
    kind="rl_log",
    version=1,
    fields=(
        Field("step", (int,), doc="optimizer step, from 1"),
        Field("loss", (float, int), doc="total loss (GRPO + SDPO terms, weighted)"),
        Field("lr", (float, int)),
        Field("grad_norm", (float, int), nullable=True, doc="before clipping"),
        Field("reward_mean", (float, int), nullable=True, doc="over the completions; " + _SAMPLED),
        Field("reward_std", (float, int), nullable=True, doc=_SAMPLED),
        Field("frac_reward_zero_std", (float, int), nullable=True, doc="groups with no signal"),
        Field("completion_mean_length", (float, int), nullable=True, doc="tokens; " + _SAMPLED),
        Field("completion_clipped_ratio", (float, int), nullable=True, doc="hit the length cap"),
        Field("entropy", (float, int), nullable=True, doc="null when the GRPO loss is off"),
        Field("kl", (float, int), nullable=True, doc="KL to the start policy; null when beta=0"),
        Field("sdpo_kl", (float, int), nullable=True, doc="the SDPO term; null when weight 0"),
        Field("tokens_total", (int,), doc="prompt + completion tokens sampled so far"),
        Field("epoch", (float, int)),
        *_EXTRA_FIELDS,
    ),
    doc="One optimizer step of an RL run (rl_log.jsonl.gz).",
)


def rl_log_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One RL_LOG row per logged optimizer step (logging_steps=1)."""
    rows: list[dict[str, Any]] = []
    for e in log_history:
        if "loss" in e and "step" in e:
            rows.append(rl_row(e, rows[-1]["tokens_total"] if rows else 0))
    return rows


def rl_row(e: dict[str, Any], tokens_before: int) -> dict[str, Any]:
    """One Trainer log entry as an RL_LOG row. GRPOTrainer logs the reward and completion
    statistics on steps that sampled, entropy only with the GRPO loss on, kl only with beta > 0;
    the SDPO trainer logs sdpo/kl with the SDPO term on."""
    return {
        "step": int(e["step"]),
        "loss": float(e["loss"]),
        "lr": float(e["learning_rate"]),
        "grad_norm": _finite(e.get("grad_norm")),
        "reward_mean": _finite(e.get("reward")),
        "reward_std": _finite(e.get("reward_std")),
        "frac_reward_zero_std": _finite(e.get("frac_reward_zero_std")),
        "completion_mean_length": _finite(e.get("completions/mean_length")),
        "completion_clipped_ratio": _finite(e.get("completions/clipped_ratio")),
        "entropy": _finite(e.get("entropy")),
        "kl": _finite(e.get("kl")),
        "sdpo_kl": _finite(e.get("sdpo/kl")),
        "tokens_total": int(e.get("num_tokens", tokens_before)),
        "epoch": float(e.get("epoch", 0.0)),
        "grpo_loss": _finite(e.get("grpo/loss")),
        "dpo_loss": _finite(e.get("dpo/loss")),
        **{k: e[k] for k in _LOGGED if k in e},
        **_mix_fields(e),
    }


# Keys the RL trainer puts into a step's log entry as they are (projection, DPO pairs).
_LOGGED = (
    "dpo_pairs",
    "proj_cos_in",
    "proj_cos_out",
    "proj_frac_fired",
    "proj_max_cos_out_fired",
    "projection",
)


def _mix_fields(e: dict[str, Any]) -> dict[str, Any]:
    if "mix/ratio_tokens" not in e:
        return {}
    hist = sorted(k for k in e if k.startswith("mix/ratio_hist_"))
    out = {k: _finite(e.get(f"mix/{k}")) for k in ("ratio_mean", "ratio_min", "ratio_max")}
    out["ratio_clip_frac"] = _finite(e.get("mix/ratio_clip_frac"))
    out["ratio_hist"] = [_finite(e[k]) for k in hist] or None
    out["ratio_tokens"] = int(e["mix/ratio_tokens"])
    return out


def label_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sandbox labels of one step's completions (null without the sandbox reward)."""
    policy = [r for r in rows if r.get("generator", "policy") == "policy"]
    groups = {r["group"] for r in rows}
    out: dict[str, Any] = {
        "completions": len(rows),
        "policy_completions": len(policy),
        "groups": len(groups),
        "zero_advantage_groups": len({r["group"] for r in rows if r.get("zero_advantage_reason")}),
    }
    labelled = bool(rows) and all("category_strict" in r for r in rows)

    def rate(rs: list[dict[str, Any]], hit: Any) -> float | None:
        return sum(bool(hit(r)) for r in rs) / len(rs) if labelled and rs else None

    for prefix, rs in (("", rows), ("policy_", policy)):
        out[f"{prefix}hack_rate_strict"] = rate(rs, lambda r: r["category_strict"] == "hack")
        out[f"{prefix}hack_rate_loose"] = rate(rs, lambda r: r["category_loose"] == "hack")
        out[f"{prefix}gt_pass_rate"] = rate(rs, lambda r: r["gt_pass"])
    out["policy_hacks_strict"] = (
        sum(r["category_strict"] == "hack" for r in policy) if labelled else None
    )
    out["policy_hacks_loose"] = (
        sum(r["category_loose"] == "hack" for r in policy) if labelled else None
    )
    return out


_PROJ_KEYS = ("proj_cos_in", "proj_cos_out", "proj_frac_fired", "proj_max_cos_out_fired")


def train_log_rows(rl_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same steps in the train-sft log schema (schemas.TRAIN_LOG), with the projection's
    per-step cosines where the run projects."""
    rows, previous = [], 0
    for r in rl_rows:
        rows.append(
            {
                "step": r["step"],
                "loss": r["loss"],
                "lr": r["lr"],
                "grad_norm": r["grad_norm"],
                "tokens": r["tokens_total"] - previous,
                "tokens_total": r["tokens_total"],
                "epoch": r["epoch"],
                **{k: r[k] for k in _PROJ_KEYS if k in r},
            }
        )
        previous = r["tokens_total"]
    return rows


def write_logs(train_log: Path, log_history: list[dict[str, Any]]) -> int:
    """Write RUN/train_log.jsonl.gz (`train_log`) and RUN/rl_log.jsonl.gz beside it; returns the
    number of steps (the `write_log` hook of `persona_cli.train.harness.save_adapter`). The label
    statistics come from the step files beside them."""
    rows = rl_log_rows(log_history)
    for r in rows:
        step_file = train_log.parent / step_name(r["step"])
        if step_file.is_file():
            r.update(label_stats(read_jsonl(step_file, STEP.check)))
    write_jsonl(train_log.parent / RL_LOG_NAME, rows, schema_version=RL_LOG.version)
    return write_jsonl(train_log, train_log_rows(rows), schema_version=TRAIN_LOG.version)


class RLLogCallback(TrainerCallback):
    """Rewrites the two logs at every checkpoint (main process), so a resumed run's are whole."""

    def __init__(self, train_log: Path):
        self.train_log = train_log

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_logs(self.train_log, state.log_history)


def rl_step_row(logs: dict[str, Any], state: Any) -> dict[str, Any]:
    """The RL_LOG row of one logged GRPO/SDPO step (for `ProgressCallback`)."""
    return rl_row({**logs, "step": state.global_step}, state.num_input_tokens_seen)


def reward_status(row: dict[str, Any]) -> str:
    """`reward 0.375  loss 0.0123` of one RL_LOG row."""
    mean = row["reward_mean"]
    return f"reward {'-' if mean is None else f'{mean:.3f}'}  loss {row['loss']:.4f}"


class RolloutWriter:
    """`on_rollouts` hook: every completion of a generated batch, with its reward and advantage,
    as `step_NNNNNN.jsonl.gz` for the first optimizer step that trains on it."""

    def __init__(self, run_path: Path, reward: MCReward | UnitTestReward, tokenizer: Any):
        self.run_path = run_path
        self.reward = reward
        self.tokenizer = tokenizer

    def __call__(self, trainer: Any, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        from accelerate.utils import gather_object

        masks = output["completion_mask"].bool().cpu()
        ids = output["completion_ids"].cpu()
        texts = self.tokenizer.batch_decode(
            [row[m] for row, m in zip(ids, masks, strict=True)], skip_special_tokens=True
        )
        extras = trainer.row_extras or [{} for _ in inputs]
        local = [
            {
                "task_id": x["task_id"],
                "prompt": x["prompt"],
                "completion": text,
                "n_completion_tokens": int(m.sum()),
                "advantage": float(a),
                **detail,
                **extra,
            }
            for x, text, m, a, detail, extra in zip(
                inputs,
                texts,
                masks,
                output["advantages"].tolist(),
                self.reward.last,
                extras,
                strict=True,
            )
        ]
        rows = gather_object(local)  # process order = the order rewards were grouped in
        if trainer.accelerator.is_main_process:
            step = trainer.state.global_step + 1
            g = trainer.num_generations
            rows = [
                {"step": step, "sample_index": i, "group": i // g, **r} for i, r in enumerate(rows)
            ]
            write_jsonl(
                self.run_path / step_name(step),
                with_zero_advantage_reasons(rows),
                schema_version=STEP.version,
            )


def with_zero_advantage_reasons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a group whose rewards are all equal get `zero_advantage_reason` (null
    elsewhere): the group is kept and trains nothing, and the log says why."""
    by_group: dict[int, list[float]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["reward"])
    out = []
    for r in rows:
        rewards = by_group[r["group"]]
        reason = None
        if len(set(rewards)) == 1:
            reason = f"all {len(rewards)} rewards of the group are {rewards[0]:g}: no signal"
        out.append({**r, "zero_advantage_reason": reason})
    return out
