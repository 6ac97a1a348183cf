"""Shared builders of the projected-RL tests (test_train_rl_*.py, test_probe_arms.py): a CLI
runner, the one-error-line check, a DPO pairs file, a second model with the same tokenizer, and a
v_hack edited tensor by tensor (through the one v_hack writer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from persona_cli.cli import app

# Small train-grpo runs on tiny-random: LoRA rank 4 / alpha 8 to match the test v_hack.
SMALL = [
    "--model",
    "tiny-random",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
    "--num-generations",
    "4",
    "--per-device-batch",
    "8",
    "--max-completion-length",
    "4",
    "--lr",
    "1e-2",
    "--seed",
    "42",  # the v_hack's adapter init seed (extract-vhack's default), so a plain run's LoRA
    # init equals a --vhack run's
]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: Any) -> Any:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result: Any, *expected: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]


def write_pairs(path: Path, n: int = 6) -> Path:
    rows = [
        {"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def perturbed_copy(model_dir: Path, out: Path, *, seed: int, scale: float) -> Path:
    """A copy of a model with seeded noise on every weight (same tokenizer): another policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def edited_vhack(src: Path, dst: Path, edit: Any) -> Path:
    """dst/v_hack.safetensors: src's tensors passed through edit(key, tensor), same metadata."""
    from persona_cli.probe.vhack import FILENAME, load_vhack, save_vhack

    tensors, meta = load_vhack(src)
    meta = {k: v for k, v in meta.items() if k != "schema_version"}
    dst.mkdir(parents=True, exist_ok=True)
    save_vhack(dst / FILENAME, {k: edit(k, t) for k, t in tensors.items()}, meta)
    return dst
