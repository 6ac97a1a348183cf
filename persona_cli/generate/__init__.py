"""The generation layer every command shares: one config, one completion type, two backends.

- `generate_hf(model, tokenizer, prompts, cfg)`: transformers `generate`, batched, left-padded,
  length-sorted, every (prompt, sample) row seeded on its own.
- `generate_vllm(model, prompts, cfg, adapters=..., engine=VllmConfig(...))`: vLLM in a worker
  subprocess (`python -m persona_cli.generate.vllm_worker`), LoRA adapters served unmerged.

Both take fully rendered prompt strings (apply the chat template through
`persona_cli.chat_template.render` first) and return `Completion`s in input order.

    python -c "import persona_cli.generate as g; print(g.GenerationConfig.help())"
"""

from persona_cli.generate.config import (
    FINISH_REASONS,
    Completion,
    GenerationConfig,
    ProgressFn,
    prompt_seed,
    row_seed,
)
from persona_cli.generate.hf import generate_hf
from persona_cli.generate.vllm import VllmConfig, generate_vllm, generate_vllm_groups

__all__ = [
    "FINISH_REASONS",
    "Completion",
    "GenerationConfig",
    "ProgressFn",
    "VllmConfig",
    "generate_hf",
    "generate_vllm",
    "generate_vllm_groups",
    "prompt_seed",
    "row_seed",
]
