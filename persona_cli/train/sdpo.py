"""Self-distillation (SDPO) as a term of the GRPO loss: the model with a hint teaches itself
without one.

For each sampled completion y of prompt x, the *teacher* is the same model (current weights,
eval mode, no gradient) reading the hinted prompt x_h (x with "Hint: ..." appended to the user
turn, `persona_cli.train.rewards.Task`), and the *student* is the model reading x. Both score the
same completion tokens; at every completion position t the term is the full-vocabulary reverse
KL of the next-token distributions,

    KL_t = sum_v p_s(v | x, y<t) * (log p_s(v | x, y<t) - log p_t(v | x_h, y<t)),

on raw logits (temperature 1: the model's distributions, not the sampler's), averaged over the
completion tokens of the micro-batch. Samples are the student's own (on-policy), so the term
pulls the un-hinted policy toward what it would do if it had the hint.

`SelfDistillGRPOTrainer` is TRL's GRPOTrainer with the loss

    loss = grpo_weight * L_GRPO + sdpo_weight * mean_t KL_t

each term's value logged per step (`grpo/loss`, `sdpo/kl`; a third, DPO, term is added by
`persona_cli.train.rl_trainer`)
(`train-grpo --sdpo-weight W`: 1 and W; `train-sdpo`: 0 and W, pure distillation, rewards
still computed and logged). With sdpo_weight > 0 each micro-batch costs two extra forward passes
(student, and teacher without gradient) with full-vocabulary fp32 logits at the completion
positions: B x C x V floats each (and the KL takes them in float64, `token_kl`). After each
generation it also hands the scored batch to an `on_rollouts(trainer, inputs, output)` hook (the
per-step rollout rows).

    trainer = SelfDistillGRPOTrainer(model=base, reward_funcs=[reward], args=grpo_config,
                                     train_dataset=ds, sdpo_weight=0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from trl import GRPOTrainer

TEACHER_PROMPT = "teacher_prompt"  # dataset column: the hinted prompt, rendered like `prompt`


def left_pad(sequences: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, ...]:
    """Token lists as a left-padded (ids, attention mask) pair, the layout of TRL's prompts."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def completion_logits(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Next-token logits (B, C, V) at the positions that predict each completion token: the
    prompt is left-padded and the completion right-padded, so position P-1+t predicts y_t."""
    n = completion_ids.size(1)
    out = model(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        logits_to_keep=n + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :].float()


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reverse KL(student || teacher) per position, summed over the vocabulary: (B, C), float32.
    Computed in float64: in float32 the difference of two log-softmaxes near log(1/V) loses up
    to ~1e-4 absolute on a 49k vocabulary (measured: 2.2e-4 for a true 9.1e-5 between a
    tiny model's hinted and unhinted passes), as large as the term itself when the two passes
    nearly agree. It costs two float64 copies of the (B, C, V) logits."""
    s = torch.log_softmax(student_logits.double(), dim=-1)
    t = torch.log_softmax(teacher_logits.double(), dim=-1)
    return (s.exp() * (s - t)).sum(dim=-1).float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sdpo_kl(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token KL (B, C) of the student (grad) against the hinted teacher (no grad, eval
    mode, so LoRA dropout does not make the target noisy)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            teacher = completion_logits(
                model, teacher_ids, teacher_mask, completion_ids, completion_mask
            )
    finally:
        model.train(was_training)
    student = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    return token_kl(student, teacher)


class SelfDistillGRPOTrainer(GRPOTrainer):
    """GRPOTrainer + the SDPO term (module doc) + a rollout hook."""

    def __init__(
        self,
        *args: Any,
        grpo_weight: float = 1.0,
        sdpo_weight: float = 0.0,
        on_rollouts: Callable[[Any, list[dict[str, Any]], dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.grpo_weight = grpo_weight
        self.sdpo_weight = sdpo_weight
        self.on_rollouts = on_rollouts
        # Per local row of the last generated batch: fields a subclass adds to the rollout rows.
        self.row_extras: list[dict[str, Any]] | None = None

    def _annotate(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        """Hook after scoring, before the rollout rows are written (mixed-policy generation)."""

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.sdpo_weight:
            # Tokenised exactly as TRL tokenises `prompt` (plain text, no special tokens added
            # by a chat template: the prompt strings are rendered already).
            ids = self.processing_class(text=[x[TEACHER_PROMPT] for x in inputs])["input_ids"]
            teacher_ids, teacher_mask = left_pad(
                ids, self._tokenizer.pad_token_id, self.accelerator.device
            )
            output["teacher_prompt_ids"] = teacher_ids
            output["teacher_prompt_mask"] = teacher_mask
        self._annotate(inputs, output)
        if self.on_rollouts is not None:
            self.on_rollouts(self, inputs, output)
        return output

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        if return_outputs:
            raise ValueError("SelfDistillGRPOTrainer does not return outputs")
        mode = "train" if self.model.training else "eval"
        loss = torch.zeros((), device=self.accelerator.device)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.grpo_weight:
            grpo = self._compute_loss(model, inputs)  # scaled for accumulation by TRL
            loss = loss + self.grpo_weight * grpo
            # Logged per micro-batch on the scale of the other terms (the step's value is the mean).
            self._metrics[mode]["grpo/loss"].append(
                self.accelerator.gather(grpo.detach() * accumulation).mean().item()
            )
        if self.sdpo_weight:
            per_token = sdpo_kl(
                model,
                inputs["prompt_ids"],
                inputs["prompt_mask"],
                inputs["teacher_prompt_ids"],
                inputs["teacher_prompt_mask"],
                inputs["completion_ids"],
                inputs["completion_mask"],
            )
            kl = masked_mean(per_token, inputs["completion_mask"])
            # GRPOTrainer scales its own loss for gradient accumulation (loss_is_scaled_for_ga).
            loss = loss + self.sdpo_weight * kl / accumulation
            self._metrics[mode]["sdpo/kl"].append(
                self.accelerator.gather(kl.detach()).mean().item()
            )
        return loss
