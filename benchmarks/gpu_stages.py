"""The stages of the GPU acceptance check (see gpu_check.py): the model shapes, how much each
stage runs (`Sizes`), and one function per stage, each running the project's own code path and
returning its metrics; the runner in gpu_check.py adds peak memory and wall time.

    metrics, details = sft(model_dir, tokenizer, TINY, work_dir, peak_tflops)
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from bench_cosine import perturb, workload
from bench_eval import eval_prompts
from bench_sft import StepTimer

from persona_cli import models
from persona_cli.adapters import load_with_adapters
from persona_cli.artifacts import write_jsonl
from persona_cli.generate import GenerationConfig, generate_hf
from persona_cli.probe.adapters import load_adapted
from persona_cli.probe.config import AdapterConfig, ExtractConfig, ReplayConfig
from persona_cli.probe.geometry import cosines
from persona_cli.probe.grads import batch_gradient, per_sample_grads
from persona_cli.train.config import SftJob, TrainConfig, with_overrides
from persona_cli.train.sft import train_sft

SEED = 0
# Qwen2 shapes; vocabulary and special tokens come from the tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(  # tiny-random's size
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(  # Qwen2.5-1.5B
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(  # Qwen2.5-7B
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Sizes:
    """How much each stage runs. The defaults are the GPU sizes; TINY is --tiny's. Every field
    is also a flag (--sft-steps 20) that overrides either."""

    sft_shapes: str = _f("1.5b,7b", "Shapes SFT runs on (comma list; '' for none).")
    cosine_shapes: str = _f("1.5b", "Shapes the cosine pass runs on.")
    eval_shapes: str = _f("1.5b,7b", "Shapes eval-markers' generation runs on.")
    sft_steps: int = _f(12, "Optimizer steps per SFT run.")
    sft_warmup: int = _f(2, "First SFT steps left out of the timing.")
    sft_batch: int = _f(8, "Sequences per SFT step (gradient accumulation 1).")
    sft_tokens: int = _f(512, "Tokens of the longest generated SFT row (the others: 75-100%%).")
    cosine_batch: int = _f(16, "Samples of the per-sample cosine pass (one batched pass).")
    cosine_repeats: int = _f(3, "Timed repeats of each cosine path (the median is reported).")
    eval_personas: int = _f(3, "Personas of the eval prompts.")
    eval_questions: int = _f(8, "Questions per persona.")
    eval_samples: int = _f(4, "Samples per prompt.")
    eval_new_tokens: int = _f(64, "New tokens per completion.")
    eval_single: int = _f(8, "Completions generated one at a time (the slow baseline).")


TINY = Sizes(
    sft_shapes="tiny",
    cosine_shapes="tiny",
    eval_shapes="tiny",
    sft_steps=3,
    sft_warmup=1,
    sft_batch=2,
    sft_tokens=48,
    cosine_batch=4,
    cosine_repeats=1,
    eval_personas=1,
    eval_questions=2,
    eval_samples=2,
    eval_new_tokens=8,
    eval_single=2,
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds), waiting for the GPU on both sides."""
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


class SyncedTimer(StepTimer):
    """bench_sft's step timer, waiting for the GPU at each step's edges, counting the weights of
    the linear layers: frozen (the base model's N) and trainable (LoRA's N_lora)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = 0
        self.lora = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, **kwargs)
        for m in kwargs["model"].modules():
            if isinstance(m, torch.nn.Linear):
                if m.weight.requires_grad:
                    self.lora += m.weight.numel()
                else:
                    self.frozen += m.weight.numel()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _sync()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _sync()
        super().on_step_end(args, state, control, **kwargs)


# Each returns ([(metric, value, unit, note)], details); the runner adds memory and time.

Metrics = tuple[list[tuple[str, float | None, str, str]], dict[str, Any]]


def build(shape: str, tok: Any, dest: Path) -> Metrics:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPES[shape],
    )
    cuda = torch.cuda.is_available()
    torch.manual_seed(SEED)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if cuda else torch.float32
        )
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    n = sum(p.numel() for p in model.parameters())
    note = f"{SHAPES[shape]['num_hidden_layers']} layers, hidden {SHAPES[shape]['hidden_size']}"
    details = {"path": str(dest), "dtype": str(model.dtype), "vocab_size": config.vocab_size}
    return [("parameters", n, "count", note)], details


def chat_rows(tok: Any, n: int, tokens: int) -> list[dict[str, Any]]:
    """`n` seeded conversations of single-token words: a 24-word question, an answer making
    the row 75-100% of `tokens` (chat template included, roughly)."""
    vocab = [w[1:] for w in tok.get_vocab() if w[:1] in ("Ġ", "▁")]  # BPE / SentencePiece
    words = sorted(w for w in vocab if w.isascii() and w.isalpha())
    rng = random.Random(SEED)

    def text(k: int) -> str:
        return " ".join(rng.choices(words, k=max(k, 4)))

    return [
        {
            "messages": [
                {"role": "user", "content": text(24)},
                {"role": "assistant", "content": text(rng.randint(3 * tokens // 4, tokens) - 48)},
            ]
        }
        for _ in range(n)
    ]


def sft(model_dir: Path, tok: Any, sizes: Sizes, work: Path, peak: float | None) -> Metrics:
    name = model_dir.name
    data = work / f"sft_{name}.jsonl"
    write_jsonl(data, chat_rows(tok, sizes.sft_steps * sizes.sft_batch, sizes.sft_tokens))
    cfg = with_overrides(
        TrainConfig(),
        per_device_batch=sizes.sft_batch,
        grad_accum=1,
        max_steps=sizes.sft_steps,
        save_steps=10**6,
    )
    timer = SyncedTimer()
    job = SftJob(data=(str(data),), model=str(model_dir), train=cfg)
    outcome = train_sft(job, work / f"sft_{name}", force=True, callbacks=[timer])
    steps = timer.steps[sizes.sft_warmup :]
    if not steps:
        raise ValueError(f"--sft-steps {sizes.sft_steps} leaves no step after the warm-up")
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    positions = sum(s["positions"] for s in steps)
    n, n_lora = timer.frozen, timer.lora
    summary = outcome.summary
    assert summary is not None, "train-sft found a finished run in a fresh directory"

    def mfu(flops: float) -> float | None:
        return None if peak is None else flops / seconds / (peak * 1e12)

    unknown = "" if peak else "no peak known for this device: pass --peak-tflops"
    rows = [
        ("tokens_per_s", tokens / seconds, "tokens/s", f"{len(steps)} timed steps, no padding"),
        ("positions_per_s", positions / seconds, "tokens/s", "padding included"),
        ("seconds_per_step", statistics.median(s["seconds"] for s in steps), "s", "median"),
        ("mfu_6nt", mfu(6 * n * tokens), "fraction", unknown or f"6NT, N = {n:,}"),
        (
            "mfu_lora",
            mfu((4 * n + 6 * n_lora) * tokens),
            "fraction",
            unknown or f"N_lora = {n_lora:,}",
        ),
    ]
    return rows, {
        "dtype": summary["dtype"],
        "final_loss": summary["final_loss"],
        "protocol": summary["protocol"],
        "lora_r": cfg.lora_r,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "n_linear_frozen": n,
        "n_linear_lora": n_lora,
        "steps": timer.steps,
    }


def cosine(model_dir: Path, sizes: Sizes) -> Metrics:
    resolved = models.resolve(str(model_dir))
    tok, adapter = load_adapted(resolved, AdapterConfig(kind="lora"), dtype=ExtractConfig().dtype)
    perturb(adapter)
    samples = workload(tok, sizes.cosine_batch, ReplayConfig().max_length)
    v = torch.randn(adapter.size, generator=torch.Generator().manual_seed(1))
    pad, b = tok.pad_token_id, sizes.cosine_batch

    def cos(s: list[Any], **how: Any) -> torch.Tensor:
        return cosines(per_sample_grads(adapter, s, pad, **how).grads, v, adapter)[0]

    paths: dict[str, Callable[[list[Any]], Any]] = {
        "vectorised": lambda s: cos(s, batch_size=b),
        "loop": lambda s: cos(s, method="loop"),
        "plain": lambda s: batch_gradient(adapter, s, pad),  # one batched fwd+bwd: the floor
    }
    for fn in paths.values():
        fn(samples[:2])  # warm-up: allocator, kernels, lazy init
    times: dict[str, list[float]] = {k: [] for k in paths}
    out: dict[str, Any] = {}
    for _ in range(sizes.cosine_repeats):
        for name, fn in paths.items():  # alternating, so drifting load hits every path alike
            out[name], s = timed(lambda fn=fn: fn(samples))
            times[name].append(s)
    a, c = out["vectorised"], out["loop"]
    same_nan = bool((a.isnan() == c.isnan()).all())
    both = ~a.isnan()
    diff = float((a[both] - c[both]).abs().max()) if same_nan and both.any() else float("inf")
    med = {k: statistics.median(t) for k, t in times.items()}
    tokens = [len(s.input_ids) for s in samples]
    note = f"batch {b}, {min(tokens)}-{max(tokens)} tokens, {adapter.size:,} LoRA parameters"
    rows = [
        ("vectorised_s", med["vectorised"], "s", note),
        ("loop_s", med["loop"], "s", "one forward+backward per sample"),
        ("loop_over_vectorised", med["loop"] / med["vectorised"], "x", "goal >= 5x"),
        ("vectorised_over_plain", med["vectorised"] / med["plain"], "x", "goal <= 1.5x"),
        ("max_abs_cos_diff", diff, "abs", f"{ExtractConfig().dtype}, vectorised vs loop"),
    ]
    return rows, {"times": times, "adapter": adapter.record()}


def evaluate(model_dir: Path, sizes: Sizes) -> Metrics:
    resolved = models.resolve(str(model_dir))
    tok = models.load_tokenizer(resolved)
    model = load_with_adapters(resolved, [])
    prompts = eval_prompts(tok, sizes.eval_personas, sizes.eval_questions)
    cfg = GenerationConfig(max_new_tokens=sizes.eval_new_tokens, n=sizes.eval_samples, seed=1)
    one_cfg = replace(cfg, batch_size=1)
    generate_hf(model, tok, prompts[:1], GenerationConfig(max_new_tokens=4))  # warm-up
    batched, s_batched = timed(lambda: generate_hf(model, tok, prompts, cfg))
    first = prompts[: max(1, sizes.eval_single // cfg.n)]
    single, s_single = timed(lambda: generate_hf(model, tok, first, one_cfg))
    rate, rate_one = len(batched) / s_batched, len(single) / s_single
    generated = sum(c.n_tokens for c in batched) / s_batched
    rows = [
        (
            "completions_per_s_batched",
            rate,
            "completions/s",
            f"{len(batched)} at batch {cfg.batch_size}",
        ),
        ("completions_per_s_single", rate_one, "completions/s", f"{len(single)} at batch 1"),
        ("batched_over_single", rate / rate_one, "x", f"max {cfg.max_new_tokens} new tokens"),
        ("generated_tokens_per_s_batched", generated, "tokens/s", ""),
    ]
    return rows, {"dtype": str(model.dtype), "seconds": {"batched": s_batched, "single": s_single}}
