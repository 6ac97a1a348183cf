"""The LM head at loss positions only: training logits where a loss term reads them, nowhere else.

TRL's SFTTrainer scores a batch through a fused LM head (`model(..., fused_lm_head=True)`, which
returns per-token log-probabilities instead of logits). On devices without Triton (a CPU) it
projects *every* position through the head (vocabulary x hidden: 49,152 x 576 on SmolLM2) and
computes the entropy of each one, although only positions whose next-token label is not -100
enter the loss. With a marker-only loss a row of ~90 tokens has one or two such positions.

`add_loss_position_head(model)` wraps that fused forward so it runs the backbone, gathers the
hidden states of the positions with a label, and applies the head to those only. Logits at a
position depend only on that position's hidden state, so the loss, its gradients and the logged
entropy / token accuracy are the same as with the head everywhere (float rounding aside; the test
checks loss and gradients against the full-logits path on tiny-random). It is exact where the
logits are a plain linear map of the hidden state; a model with logit soft-capping or a logit
scale keeps TRL's head (`add_loss_position_head` returns False and the run records "all").

The positions are scored in chunks of `CHUNK` rows, each recomputed in backward (activation
checkpointing), so a whole-answer loss over thousands of positions never holds a full
positions x vocabulary logits tensor.

    trainer = SFTTrainer(...)                       # TRL adds its fused head
    add_loss_position_head(trainer.model.get_base_model())
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

CHUNK = 2048  # positions per LM-head chunk


def supports_loss_positions(model: Any) -> bool:
    """True when the logits are a plain linear map of the last hidden state (no soft-capping,
    no logit scale), so heading only the loss positions is exact."""
    cfg = model.config.get_text_config()
    scales = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return getattr(cfg, "final_logit_softcapping", None) is None and all(
        getattr(cfg, name, None) in (None, 1, 1.0) for name in scales
    )


def _chunk_scores(hidden: Any, weight: Any, bias: Any, labels: Any) -> tuple[Any, Any, Any]:
    import torch

    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    logp = logits.log_softmax(-1)
    log_probs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    is_top1 = (logits.argmax(-1) == labels).to(logits.dtype)
    return log_probs, entropy, is_top1


def score_positions(hidden: Any, weight: Any, bias: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Per-position (log-probability of the label, entropy, label is the argmax) for rows of
    `hidden` (positions x hidden), in chunks recomputed in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    outs = []
    # No position at all still makes one (empty) chunk, so the result stays in the graph.
    for start in range(0, max(hidden.shape[0], 1), CHUNK):
        h, y = hidden[start : start + CHUNK], labels[start : start + CHUNK]
        if torch.is_grad_enabled() and h.requires_grad and h.shape[0]:
            outs.append(checkpoint(_chunk_scores, h, weight, bias, y, use_reentrant=False))
        else:
            outs.append(_chunk_scores(h, weight, bias, y))
    log_probs, entropy, is_top1 = (torch.cat(parts) for parts in zip(*outs, strict=True))
    return log_probs, entropy, is_top1


@dataclass
class LossPositionOutput:
    """What TRL's SFTTrainer.compute_loss reads from a fused-head forward (its
    `FusedCausalLMOutput` fields): per-token values of shape (batch, seq - 1), zero where the
    label is -100."""

    loss: Any
    log_probs: Any
    entropy: Any
    is_top1: Any
    label_mask: Any
    aux_loss: Any = None


def add_loss_position_head(model: Any) -> bool:
    """Make `model(..., labels=..., fused_lm_head=True)` head only the positions with a label.
    `model` is the causal LM (under PEFT: `peft_model.get_base_model()`), already patched by TRL;
    other calls (no `fused_lm_head`, generation) go to the forward it had. Returns False, and
    changes nothing, when the model's logits are not a plain linear map (see the module doc)."""
    if not supports_loss_positions(model):
        return False
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head or kwargs.get("output_router_logits"):
            return previous(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # the decoder stack
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        mask = labels != -100
        scored = score_positions(hidden[mask], head.weight, head.bias, labels[mask])
        # masked_scatter keeps the result attached to the graph even when no label is valid.
        log_probs, entropy, is_top1 = (
            x.new_zeros(mask.shape).masked_scatter(mask, x) for x in scored
        )
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return LossPositionOutput(
            loss=-log_probs.sum() / denominator,
            log_probs=log_probs,
            entropy=entropy.detach(),
            is_top1=is_top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
