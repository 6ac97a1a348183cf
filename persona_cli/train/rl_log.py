"""Per-step artifacts of an RL run (train-grpo, train-sdpo): the two step logs and the rollouts.

- `rl_log.jsonl.gz`: one `RL_LOG` row per optimizer step: loss, lr, grad norm, reward mean and
  std over the step's completions, the fraction of groups whose rewards were all equal (no
  signal), completion length and clipping, entropy, the KL terms. Derived from the Trainer's
  `log_history`, which checkpoints store, so a resumed run's log is whole.
- `train_log.jsonl.gz`: the same steps in the train-sft schema (`schemas.TRAIN_LOG`).
- `step_NNNNNN.jsonl.gz`: every completion sampled for optimizer step N with its prompt, reward,
  advantage, group and the reward's details (generic `schemas.STEP` rows), written by
  `RolloutWriter`, the trainer's `on_rollouts` hook.

    rows = rl_log_rows(trainer.state.log_history)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from persona_cli.artifacts import write_jsonl
from persona_cli.probe.pool import step_name
from persona_cli.schemas import STEP, TRAIN_LOG, Field, RowSchema
from persona_cli.train.rewards import MCReward, UnitTestReward

RL_LOG_NAME = "rl_log.jsonl.gz"


def _finite(v: Any) -> float | None:
    return None if v is None or v != v else float(v)  # NaN (v != v) -> null


_SAMPLED = "null on a step that trained on the previous step's samples (--num-iterations > 1)"

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
    }


def train_log_rows(rl_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same steps in the train-sft log schema (schemas.TRAIN_LOG)."""
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
            }
        )
        previous = r["tokens_total"]
    return rows


def write_logs(train_log: Path, log_history: list[dict[str, Any]]) -> int:
    """Write RUN/train_log.jsonl.gz (`train_log`) and RUN/rl_log.jsonl.gz beside it; returns the
    number of steps (the `write_log` hook of `persona_cli.train.harness.save_adapter`)."""
    rows = rl_log_rows(log_history)
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
        local = [
            {
                "task_id": x["task_id"],
                "prompt": x["prompt"],
                "completion": text,
                "n_completion_tokens": int(m.sum()),
                "advantage": float(a),
                **detail,
            }
            for x, text, m, a, detail in zip(
                inputs, texts, masks, output["advantages"].tolist(), self.reward.last, strict=True
            )
        ]
        rows = gather_object(local)  # process order = the order rewards were grouped in
        if trainer.accelerator.is_main_process:
            step = trainer.state.global_step + 1
            g = trainer.num_generations
            write_jsonl(
                self.run_path / step_name(step),
                [
                    {"step": step, "sample_index": i, "group": i // g, **r}
                    for i, r in enumerate(rows)
                ],
                schema_version=STEP.version,
            )
