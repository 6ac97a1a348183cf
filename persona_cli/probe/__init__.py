"""The reward-hack gradient probe (DESIGN.md experiment 4): stages a-d and the acceptance checks.

    persona-cli probe teacher-pool --model smollm2-135m --adapter runs/teacher --out runs/pool
    persona-cli extract-vhack --pool runs/pool --model smollm2-135m --adapter lora --out runs/vhack
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --out runs/replay_vanilla
    persona-cli probe replay --pool runs/pool --vhack runs/vhack --projected --out runs/replay_proj
    persona-cli probe-uat --pool runs/pool --vanilla runs/replay_vanilla \\
        --projected runs/replay_proj --out runs/uat

Modules, by concept:
- `config`: every default (AdapterConfig, ExtractConfig, ReplayConfig, UATConfig), with help.
- `adapters`: the probe adapters (PEFT LoRA, SVD delta) over a frozen base, and their layout.
- `encoding`: prompt/completion tokens, completion-only scoring, right padding.
- `grads`: per-sample gradients, batched (hooks) and loop (reference).
- `geometry`: plain and norm-weighted cosines with v_hack, the per-module projection.
- `teacher_pool`: stage a, a teacher's sampled completions labelled by the sandbox, per step.
- `pool`: teacher-pool rows (read, label through the sandbox, write); pairs files.
- `vhack`: v_hack.safetensors and its metadata; `extract`: the extract-vhack stage.
- `replay`: the probe replay stage; `steps`: per-step aggregates of its rows.
- `uat`: the T1-T4 acceptance checks.
"""
