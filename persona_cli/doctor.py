"""`persona-cli doctor`: what this machine offers an experiment, gathered without side effects.

It reports versions, accelerators, free disk, the model cache, which API keys are set (names
only, never values) and which optional tools are present. It imports nothing heavy beyond torch
and never starts vLLM: `find_spec` tells whether a package is installed without running it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from persona_cli import manifest, models

API_KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN", "WANDB_API_KEY")
TOOLS = ("just", "pueue", "accelerate", "git", "unshare", "nvidia-smi")


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def report() -> dict[str, Any]:
    home = models.home()
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": manifest.package_versions(),
        "device": manifest.device_info(),
        "git": manifest.git_info(),
        "persona_cli_home": str(home),
        "disk_free_bytes": {"home": _free_bytes(home), "cwd": _free_bytes(Path.cwd())},
        "models": models.list_builtin(),
        "embedded_wheel": _embedded_wheel(),
        "api_keys": {name: bool(os.environ.get(name)) for name in API_KEY_VARS},
        "vllm_importable": importlib.util.find_spec("vllm") is not None,
        "tools": {name: shutil.which(name) for name in TOOLS},
    }


def _embedded_wheel() -> str | None:
    try:
        return str(models.embedded_gguf())
    except Exception as e:  # a missing wheel is a finding here, not an error
        return f"missing: {e}"
