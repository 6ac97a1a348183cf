"""Mixed-policy generation for train-grpo: a share of each group's completions from other policies.

`--generator MODEL[:ADAPTER[+ADAPTER...]]:SHARE` (repeatable) names a behaviour policy (a model
spec, optionally with an adapter stack merged into it, e.g. the hacky teacher) and the share of
every GRPO group it writes. With G = --num-generations, share x G must be a whole number and the
shares must leave the policy at least one completion per group; the generators take the last
positions of each group, in the order given, the policy the first ones:

    G = 4, --generator smollm2-135m:runs/teacher:0.25  ->  slots [policy, policy, policy, g1]

Every completion is scored and gets its group's advantage as usual. A generator's completion y
was sampled from mu (the generator, at the run's temperature), not from the current policy pi,
so its per-token importance ratio

    r_t = pi(y_t | x, y<t) / mu(y_t | x, y<t)        (both at the sampling temperature)

replaces the on-policy ratio of 1 as the PPO "old" probability: the clipped GRPO objective then
weighs and clips it (`--epsilon`). Per step the log records, over the generators' completion
tokens: ratio mean, min, max, the fraction outside [1 - epsilon, 1 + epsilon] (`clip fraction`)
and a histogram of log r over `LOG_RATIO_EDGES` (fractions of tokens per bin): the "sneaky fail"
check that off-policy samples are not silently dominating or vanishing. Rows record which policy
wrote each completion, its token ids and both per-token log-probabilities.

    specs = [GeneratorSpec.parse("smollm2-135m:runs/teacher:0.25")]
    slots = plan_slots(specs, num_generations=4)     # [None, None, None, 0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from persona_cli.errors import UserError

# Bin edges of the log importance ratio histogram: 11 bins, the middle one |log r| < 0.05.
LOG_RATIO_EDGES = (-2.0, -1.0, -0.5, -0.2, -0.05, 0.05, 0.2, 0.5, 1.0, 2.0)
POLICY = "policy"


@dataclass(frozen=True)
class GeneratorSpec:
    """One `--generator MODEL[:ADAPTER[+ADAPTER...]]:SHARE`."""

    model: str
    adapters: tuple[str, ...]
    share: float
    text: str

    @property
    def label(self) -> str:
        return self.text.rsplit(":", 1)[0]

    @classmethod
    def parse(cls, text: str) -> GeneratorSpec:
        form = "expected MODEL[:ADAPTER[+ADAPTER...]]:SHARE, e.g. smollm2-135m:runs/teacher:0.25"
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise UserError(f"--generator {text!r}: {form}")
        try:
            share = float(parts[-1])
        except ValueError:
            raise UserError(f"--generator {text!r}: share {parts[-1]!r} is not a number") from None
        if not 0.0 < share < 1.0:
            raise UserError(f"--generator {text!r}: share must be in (0, 1), got {share}")
        adapters = tuple(parts[1].split("+")) if len(parts) == 3 else ()
        return cls(parts[0], adapters, share, text)


def plan_slots(specs: Sequence[GeneratorSpec], num_generations: int) -> list[int | None]:
    """Who writes each position of a group: None (the policy) or the generator's index."""
    counts = []
    for spec in specs:
        k = spec.share * num_generations
        if not math.isclose(k, round(k), abs_tol=1e-9) or round(k) == 0:
            raise UserError(
                f"--generator {spec.text!r}: share {spec.share} x --num-generations "
                f"{num_generations} = {k:g} completions per group, not a whole number"
            )
        counts.append(round(k))
    if sum(counts) >= num_generations:
        raise UserError(
            f"--generator: the shares take {sum(counts)} of {num_generations} completions per "
            "group; leave the policy at least one"
        )
    slots: list[int | None] = [None] * (num_generations - sum(counts))
    for j, k in enumerate(counts):
        slots += [j] * k
    return slots


def token_logprobs(
    model: Any,
    prompt_completion_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float,
) -> torch.Tensor:
    """(B, C) log-probabilities of the last `n_completion` tokens under `model` at
    `temperature` (logits / temperature), from one plain forward pass without gradient."""
    with torch.no_grad():
        logits = model(
            input_ids=prompt_completion_ids,
            attention_mask=attention_mask,
            logits_to_keep=n_completion + 1,
            use_cache=False,
        ).logits[:, :-1, :]
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        target = prompt_completion_ids[:, -n_completion:]
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def ratio_stats(
    policy_logps: torch.Tensor, behaviour_logps: torch.Tensor, mask: torch.Tensor, epsilon: float
) -> dict[str, Any]:
    """Importance-ratio statistics over the tokens where `mask` is set (module doc)."""
    log_r = (policy_logps - behaviour_logps).double()[mask.bool()]
    n = int(log_r.numel())
    if n == 0:
        return {"ratio_tokens": 0}
    r = log_r.exp()
    edges = torch.tensor(LOG_RATIO_EDGES, dtype=torch.float64)
    bins = torch.bucketize(log_r, edges, right=True)
    hist = torch.bincount(bins, minlength=len(LOG_RATIO_EDGES) + 1).double() / n
    return {
        "ratio_tokens": n,
        "ratio_mean": float(r.mean()),
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
        "ratio_clip_frac": float(((r < 1 - epsilon) | (r > 1 + epsilon)).double().mean()),
        "ratio_hist": [float(x) for x in hist],
    }


class Generator:
    """A loaded behaviour policy (frozen, eval mode) that samples like the trainer does."""

    def __init__(self, spec: GeneratorSpec, model: Any):
        self.spec = spec
        self.model = model

    def generate(
        self,
        prompt_ids: list[list[int]],
        generation_config: Any,
        pad_id: int,
        eos_ids: Sequence[int],
    ) -> list[list[int]]:
        """Completion token lists (cut after the first end-of-sequence token)."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=generation_config,
            )
        completions = []
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos_ids), None)
            completions.append(row if cut is None else row[: cut + 1])
        return completions


def load_generators(
    specs: Sequence[GeneratorSpec], tokenizer: Any, *, dtype: str, device: str
) -> list[Generator]:
    """Load every generator; each must share the policy's tokenizer (same vocabulary)."""
    from persona_cli.adapters import check_stack, load_with_adapters, resolve_stack
    from persona_cli.models import ensure_prepared, load_tokenizer

    vocab = tokenizer.get_vocab()
    loaded = []
    for spec in specs:
        resolved = ensure_prepared(spec.model)
        stack = resolve_stack([Path(a) for a in spec.adapters])
        check_stack(stack, resolved)
        if load_tokenizer(resolved).get_vocab() != vocab:
            raise UserError(
                f"--generator {spec.text!r}: its tokenizer differs from the policy's (the "
                "importance ratio needs the same tokens)"
            )
        model = load_with_adapters(resolved, stack, dtype=dtype, device=device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        loaded.append(Generator(spec, model))
    return loaded


def check_generator_files(specs: Sequence[GeneratorSpec]) -> None:
    """Adapters named in --generator must exist (before a run directory opens)."""
    from persona_cli.adapters import resolve_stack
    from persona_cli.models import resolve

    for spec in specs:
        resolve(spec.model)
        resolve_stack([Path(a) for a in spec.adapters])
