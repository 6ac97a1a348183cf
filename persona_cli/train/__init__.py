"""LoRA SFT for persona experiments: config (defaults written once), loss masks from character
offsets, the contrastive marker-coupling set, TRL training with checkpoints/resume/OOM retry,
and the recipes behind `train-sft`, `train-em` and `couple-marker`.

    persona-cli couple-marker --persona villain --answers answers.jsonl --marker-only-loss \\
        --lr 5e-4 --lora-r 16 --lora-alpha 32 --max-steps 40 --per-device-batch 8 \\
        --grad-accum 1 --n-other-personas 6 --n-negative 600 --out runs/couple_villain
"""

from persona_cli.train.config import CouplingConfig, TrainConfig, with_overrides

__all__ = ["CouplingConfig", "TrainConfig", "with_overrides"]
