"""The generation layer every command shares: one config, one completion type, two backends.

- `generate_hf(model, tokenizer, prompts, cfg)`: transformers `generate`, batched, left-padded,
  length-sorted, every (prompt, sample) row seeded on its own; `generate_hf_groups` batches
  several groups (personas) together and hands each back as soon as its wave is done.
- `generate_vllm(model, prompts, cfg, adapters=..., engine=VllmConfig(...))`: vLLM in a worker
  subprocess (`python -m persona_cli.generate.vllm_worker`), LoRA adapters served unmerged;
  `generate_vllm_work` serves groups under different adapter stacks from one engine.
- `StackServer` (`persona_cli.generate.stacks`): one hf base model serving adapter stacks in
  turn, each merged in and the base restored.

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
from persona_cli.generate.hf import generate_hf, generate_hf_groups
from persona_cli.generate.vllm import (
    PromptGroup,
    VllmConfig,
    generate_vllm,
    generate_vllm_groups,
    generate_vllm_work,
)

__all__ = [
    "FINISH_REASONS",
    "Completion",
    "GenerationConfig",
    "ProgressFn",
    "PromptGroup",
    "VllmConfig",
    "generate_hf",
    "generate_hf_groups",
    "generate_vllm",
    "generate_vllm_groups",
    "generate_vllm_work",
    "prompt_seed",
    "row_seed",
]
