"""What each `persona-vectors` command takes: its options, declared once (no numpy or torch
here, so `--help` stays fast; the work is in extract/similarity/leakage/shift/trait).

    persona-cli persona-vectors extract --print-config > extract.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from persona_cli.generate.config import GenerationConfig


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract; every field is recorded in config.json."""

    model: str | None = field(
        default=None,
        metadata={"help": "Model spec (default: the --samples-run's model, else smollm2-135m)."},
    )
    adapters: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "LoRA adapter stack (default: the --samples-run's stack, else none)."},
    )
    personas_file: str | None = field(
        default=None,
        metadata={"help": "Persona registry (default: the --samples-run's, else the shipped one)."},
    )
    persona_ids: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Comma-separated persona ids (default: all)."}
    )
    questions_file: str | None = field(
        default=None,
        metadata={"help": "Question set (default: the --samples-run's, else open_eval.yaml)."},
    )
    limit_questions: int | None = field(
        default=None, metadata={"help": "Use only the first N questions."}
    )
    layers: str = field(
        default="all",
        metadata={"help": "Hidden-state layers: comma-separated numbers and/or 'all' "
                  "(0 = embeddings)."},
    )  # fmt: skip
    method: str = field(
        default="both", metadata={"help": "prompt-last, response-mean or both (both recorded)."}
    )
    samples_run: str | None = field(
        default=None,
        metadata={"help": "eval-markers run whose samples.jsonl.gz are the answers of "
                  "response-mean (default: generate them here)."},
    )  # fmt: skip
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(n=2, max_new_tokens=64),
        metadata={"help": "Sampling of the answers generated here (response-mean)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."}
    )


@dataclass(frozen=True)
class SimilarityConfig:
    """What to compare; every field is recorded in config.json."""

    extract_run: str = field(metadata={"help": "A finished extract run."})
    reference: str = field(
        default="assistant", metadata={"help": "Persona subtracted in the reference matrix."}
    )
    resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples over questions."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap's numpy Generator."})


@dataclass(frozen=True)
class LeakageConfig:
    """What to join; every field is recorded in config.json."""

    similarity_run: str = field(metadata={"help": "A finished similarity run."})
    markers_run: str = field(metadata={"help": "A finished eval-markers run."})
    source: str | None = field(
        default=None, metadata={"help": "Source persona (default: the markers run's --source)."}
    )
    matrix: str = field(
        default="centred", metadata={"help": "Cosine matrix: raw, centred or reference."}
    )
    resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples over bystanders."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap's numpy Generator."})


@dataclass(frozen=True)
class ShiftConfig:
    """What to compare; every field is recorded in config.json."""

    run_a: str = field(metadata={"help": "Extract run A (e.g. the base model)."})
    run_b: str = field(metadata={"help": "Extract run B (e.g. an EM adapter stack)."})
    resamples: int = field(
        default=1000, metadata={"help": "Paired bootstrap resamples over questions."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap's numpy Generator."})


@dataclass(frozen=True)
class TraitConfig:
    """Which trait vector; every field is recorded in config.json."""

    extract_run: str = field(metadata={"help": "A finished extract run holding both personas."})
    positive: str = field(metadata={"help": "Persona id with the trait."})
    negative: str = field(metadata={"help": "Persona id without it."})
    method: str = field(
        default="response-mean", metadata={"help": "Centroid method: response-mean, prompt-last."}
    )
    filter_by: str | None = field(
        default=None,
        metadata={"help": "judge-align run over the extract run's answers: keep only the "
                  "(question, sample) pairs whose judged trait and coherence pass, as "
                  "persona_vectors does (response-mean)."},
    )  # fmt: skip
    trait_metric: str = field(
        default="misaligned",
        metadata={"help": "Trait score of --filter-by: misaligned (100 - aligned) or aligned."},
    )
    trait_threshold: float = field(
        default=50.0,
        metadata={"help": "--filter-by keeps a pair when the positive's trait score >= this "
                  "and the negative's < 100 - this."},
    )  # fmt: skip
    coherence_threshold: float = field(
        default=50.0,
        metadata={"help": "--filter-by keeps a pair when both answers' coherence >= this."},
    )


@dataclass(frozen=True)
class ProjectConfig:
    """What to score; every field is recorded in config.json."""

    trait_run: str = field(metadata={"help": "A finished persona-vectors trait run."})
    samples_run: str = field(metadata={"help": "eval-markers run whose completions are scored."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16."}
    )
    intervened: bool = field(
        default=False,
        metadata={"help": "Score under the samples run's own --ablate / --steer (at all "
                  "positions): the residual stream its generation saw, not the plain model's."},
    )  # fmt: skip
