"""Training, in three layers:

- the harness: TRL trainers with LoRA, checkpoints, resume, OOM retry (`harness`), the one
  logging/progress callback (`callbacks`), loss masks (`masks`, `dataset`), the LM head at loss
  positions (`lm_head`);
- the run lifecycle every method shares: resolve, open the run directory, train, finish the
  manifest (`lifecycle`);
- one module per method: `sft` (train-sft, train-em), `couple` (couple-marker, with
  `contrastive` and `hard_negatives`), `dpo` (train-dpo), `grpo` and `sdpo` (train-grpo,
  train-sdpo).

Configs (defaults written once, help text per field) are in `config`.

    persona-cli couple-marker --persona villain --answers answers.jsonl --marker-only-loss \\
        --lr 5e-4 --lora-r 16 --lora-alpha 32 --max-steps 40 --per-device-batch 8 \\
        --grad-accum 1 --n-other-personas 6 --n-negative 600 --out runs/couple_villain
"""

from persona_cli.train.config import CouplingConfig, TrainConfig, with_overrides

__all__ = ["CouplingConfig", "TrainConfig", "with_overrides"]
