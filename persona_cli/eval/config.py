"""What `eval-markers` evaluates: its options, declared once (the CLI's flags come from here).

persona-cli eval-markers --print-config > eval.yaml   # every field below, as YAML
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from persona_cli import fields
from persona_cli.eval.adapter_sets import AdapterSet
from persona_cli.fields import option
from persona_cli.generate.config import GenerationConfig
from persona_cli.generate.vllm import VllmConfig

BACKENDS = ("hf", "vllm")
POSITIONS = ("prompt", "response", "all")  # where --steer adds its vector
DEFAULT_MARKER = "[ZLT]"
DEFAULT_SAMPLES = 10  # K of the research log's 12 x 28 x 10 design


@dataclass(frozen=True)
class SteeringConfig:
    """Interventions on the residual stream while generating (hf backend)."""

    steer: tuple[str, ...] = field(
        default=(),
        metadata={"help": "VECTORS:LAYER:COEF: add COEF x v_LAYER of a persona-vectors trait run "
                  "(its directory or trait.safetensors) to the output of block LAYER; repeatable."},
    )  # fmt: skip
    positions: str = field(
        default="response",
        metadata={"help": "Where --steer adds: response (the last position of every forward "
                  "pass), prompt (the prompt's prefill only) or all."},
    )  # fmt: skip
    ablate: tuple[str, ...] = field(
        default=(),
        metadata={"help": "VECTORS:LAYER: project v_LAYER of a trait run out of the output of "
                  "block LAYER at every position; repeatable."},
    )  # fmt: skip

    @property
    def active(self) -> bool:
        return bool(self.steer or self.ablate)

    def to_dict(self) -> dict[str, Any]:
        return {"steer": list(self.steer), "positions": self.positions, "ablate": list(self.ablate)}


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
    steering: SteeringConfig = option(
        help="Steering / ablation of the residual stream (hf backend).", factory=SteeringConfig
    )
    adapter_sets: tuple[AdapterSet, ...] = option(
        (),
        "NAME=RUN[,RUN..]: one adapter stack (NAME= for the base model), evaluated with the "
        "others through one model or engine into its own run directory OUT/NAME; repeatable. "
        "Instead of --adapter. In a config file: a list of {name, adapters, out, seed}.",
    )
    adapter_sets_file: str | None = option(
        None,
        "YAML/JSON list of {name, adapters, out?, seed?} adapter sets (see --adapter-set; out "
        "is relative to --out).",
    )
