"""What `eval-markers` evaluates: its options, declared once (the CLI's flags come from here).

persona-cli eval-markers --print-config > eval.yaml   # every field below, as YAML
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_cli import fields
from persona_cli.fields import option
from persona_cli.generate.config import GenerationConfig
from persona_cli.generate.vllm import VllmConfig

BACKENDS = ("hf", "vllm")
DEFAULT_MARKER = "[ZLT]"
DEFAULT_SAMPLES = 10  # K of the research log's 12 x 28 x 10 design


@dataclass(frozen=True)
class MarkerEvalConfig:
    """What to evaluate; config.json records it resolved (files hashed, the model resolved)."""

    model: str = fields.model()
    adapters: tuple[str, ...] = fields.adapters()
    personas_file: str | None = fields.personas_file()
    persona_ids: tuple[str, ...] | None = fields.persona_ids()
    questions_file: str | None = fields.questions_file("data/questions/open_eval.yaml")
    marker: str = option(DEFAULT_MARKER, "Marker substring.")
    case_sensitive: bool = option(True, "Match the marker's case or not.")
    source: str | None = option(None, "Persona the marker was coupled to; the rest are bystanders.")
    negatives: tuple[str, ...] | None = option(
        None,
        "Comma-separated personas the coupling trained without the marker, reported apart from "
        "the bystanders (default: read from the adapters' couple-marker runs).",
    )
    backend: str = option("hf", f"Generation backend: {' or '.join(BACKENDS)}.")
    generation: GenerationConfig = option(
        help="Sampling options; n is K, the samples per persona and question.",
        factory=lambda: GenerationConfig(n=DEFAULT_SAMPLES),
    )
    vllm: VllmConfig = option(help="vLLM engine (--backend vllm).", factory=VllmConfig)
