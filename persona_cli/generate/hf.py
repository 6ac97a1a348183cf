"""Batched sampling with transformers' `generate`: left padding, length-sorted batches, seeded rows.

Every (prompt, sample) pair is one row. Rows are sorted by prompt length (longest first, so an
out-of-memory error comes at once rather than at the end) and cut into batches of `batch_size`;
each batch is left-padded, which is what a decoder-only model needs to continue every row from
its last real token. Results come back in input order.

Seeding. transformers samples every row of a batch from the one global torch generator, so a
prompt's samples would change with whatever else shares its batch. Instead `generate` runs in
greedy mode and `RowSampler`, the last logits processor, draws each row's next token itself with
that row's own `torch.Generator`, seeded by `row_seed(seed, prompt, sample_index)`; it returns a
one-hot score vector that greedy selection then takes. So:
- reproducible: the same prompt, sample index, seed, model, dtype, device and software versions
  give the same text, whatever the batch size, the order of the prompts or the other prompts;
- not guaranteed: across batch compositions the logits differ by float rounding (padding changes
  the matmul shapes), which can flip a draw where two tokens' cumulative probabilities straddle
  the uniform number drawn; it is rare and affects one token, after which the texts diverge.
  Different hardware, dtypes or library versions give different texts, as with any sampler.
- temperature 0 is plain greedy decoding (ties broken by torch's argmax).

    python -c "from persona_cli.generate import hf; help(hf.generate_hf)"
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from persona_cli.generate.config import Completion, GenerationConfig, ProgressFn, row_seed

log = logging.getLogger(__name__)


class RowSampler:
    """Logits processor that samples each row with its own generator (see module doc).

    `generators[i]` belongs to row i of the batch; transformers keeps row order through greedy
    generation. Temperature and top-p are applied here, not by transformers' warpers.
    """

    def __init__(self, generators: Sequence[Any], temperature: float, top_p: float):
        self.generators = list(generators)
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.temperature == 0:
            return scores
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        u = torch.stack([torch.rand((), generator=g, device=g.device) for g in self.generators]).to(
            probs.device
        )
        if self.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p: a token stays when the mass
            # before it is still below top_p (so the most likely token always stays).
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        pick = pick.clamp(max=probs.shape[-1] - 1)
        if self.top_p < 1.0:
            pick = order.gather(1, pick)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick, 0.0)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _hf_generation_config(model: Any, cfg: GenerationConfig, pad_id: int, eos_ids: list[int]):
    from transformers import GenerationConfig as HFGenerationConfig

    # Explicit values, because generate() fills every unset (None) field from the model's own
    # generation_config: Qwen2.5's ships repetition_penalty=1.05, which would apply even here.
    return HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        bos_token_id=model.generation_config.bos_token_id,
    )


def _finish(tokens: list[int], eos_ids: set[int], tokenizer: Any) -> tuple[str, int, str]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokenizer.decode(tokens[:i], skip_special_tokens=True), i + 1, "stop"
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "length"


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: GenerationConfig,
    progress: ProgressFn | None = None,
) -> list[Completion]:
    """Sample `cfg.n` completions for each fully rendered prompt string (chat template already
    applied). Returns `len(prompts) * cfg.n` completions ordered by (prompt_index,
    sample_index)."""
    import torch

    model.eval()
    device = model.device
    # The rendered chat template already holds any BOS token; adding one again would double it.
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    hf_cfg = _hf_generation_config(model, cfg, pad_id, eos)
    rows = [(i, s) for i in range(len(prompts)) for s in range(cfg.n)]
    rows.sort(key=lambda r: (-len(encoded[r[0]]), r))  # stable: ties keep input order
    results: dict[tuple[int, int], Completion] = {}
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        width = max(len(encoded[i]) for i, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (i, _) in enumerate(batch):
            seq = encoded[i]
            ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[r, width - len(seq) :] = 1
        generators = []
        for i, s in batch:
            g = torch.Generator(device=device)
            g.manual_seed(row_seed(cfg.seed, prompts[i], s))
            generators.append(g)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=hf_cfg,
                logits_processor=[RowSampler(generators, cfg.temperature, cfg.top_p)],
            )
        new = out[:, width:].tolist()
        for r, (i, s) in enumerate(batch):
            text, n_tokens, reason = _finish(new[r], set(eos), tokenizer)
            results[(i, s)] = Completion(i, s, text, n_tokens, reason)
        log.debug("hf batch of %d rows (prompt width %d) done", len(batch), width)
        if progress is not None:
            progress(len(batch))
    return [results[(i, s)] for i in range(len(prompts)) for s in range(cfg.n)]


GroupFn = Callable[[int, list[Completion]], None]
WAVE_BATCHES = 4  # a wave holds at least this many batches' worth of rows


def generate_hf_groups(
    model: Any,
    tokenizer: Any,
    groups: Sequence[Sequence[str]],
    cfg: GenerationConfig,
    progress: ProgressFn | None = None,
    on_group: GroupFn | None = None,
    wave_rows: int | None = None,
) -> list[list[Completion]]:
    """Several groups of rendered prompts (eval-markers: one group per persona), batched across
    groups. Consecutive groups are taken into waves of at least `wave_rows` rows (default
    WAVE_BATCHES x batch_size); each wave is one `generate_hf` call, so rows of different groups
    share batches (fewer, fuller, better length-sorted batches than one call per group), and
    `on_group(i, completions)` is called for each group of a wave as soon as the wave is done
    (a caller persists it: a kill loses at most one wave). Row seeds depend only on (seed,
    prompt, sample index), so a group's samples are those one call per group would give (up to
    the float rounding the module doc describes). Returns each group's completions, ordered by
    (prompt_index, sample_index) within the group."""
    wave_rows = wave_rows or WAVE_BATCHES * cfg.batch_size
    results: list[list[Completion]] = []
    start = 0
    while start < len(groups):
        end, rows = start, 0
        while end < len(groups) and (end == start or rows < wave_rows):
            rows += len(groups[end]) * cfg.n
            end += 1
        flat = [p for g in groups[start:end] for p in g]
        done = generate_hf(model, tokenizer, flat, cfg, progress) if flat else []
        offset = 0
        for i in range(start, end):
            size = len(groups[i])
            mine = [
                Completion(c.prompt_index - offset, c.sample_index, c.text, c.n_tokens,
                           c.finish_reason)
                for c in done[offset * cfg.n : (offset + size) * cfg.n]
            ]  # fmt: skip
            results.append(mine)
            if on_group is not None:
                on_group(i, mine)
            offset += size
        start = end
    return results
