"""Hub specs against a local fake Hugging Face cache (HF_HUB_OFFLINE=1, the cache layout
models--ORG--REPO/{refs/REVISION, snapshots/SHA/...}), and --push-to-hub through an injected
upload function: the token never reaches an artifact.

    python -m pytest tests/test_hub.py -q
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_cli import bundled, hub
from persona_cli.artifacts import read_json
from persona_cli.cli import app
from persona_cli.errors import UserError
from persona_cli.models import TINY, resolve

SHA_MAIN = "1" * 40
SHA_V1 = "2" * 40
SUB = "runs/evil_ai_seed42"
TOKEN = "hf_FAKEtoken0123456789SECRET"


@pytest.mark.parametrize(
    ("text", "repo", "revision", "subfolder"),
    [
        ("hf:org/repo", "org/repo", None, None),
        ("hf:org/repo@v1", "org/repo", "v1", None),
        ("hf:org/repo:a/b", "org/repo", None, "a/b"),
        (f"hf:org/re.po-2@{SHA_V1}:{SUB}/", "org/re.po-2", SHA_V1, SUB),
        ("hf:superkaiba1/explore-persona-space:single_token_multi_source/evil_ai_seed42",
         "superkaiba1/explore-persona-space", None, "single_token_multi_source/evil_ai_seed42"),
    ],
)  # fmt: skip
def test_parse(text: str, repo: str, revision: str | None, subfolder: str | None) -> None:
    assert hub.parse(text) == hub.HubSpec(repo, revision, subfolder)


@pytest.mark.parametrize("text", ["hf:repo", "hf:org/repo@", "hf:org/repo:", "hf:/x", "org/repo"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(UserError, match=r"expected hf:ORG/REPO|starts with 'hf:'"):
        hub.parse(text)
    assert hub.parse_push_target("org/repo:a/b") == hub.PushTarget("org/repo", "a/b")
    with pytest.raises(UserError, match="--push-to-hub"):
        hub.parse_push_target("org/repo@main")


def _adapter(path: Path, seed: int) -> None:
    """A plain PEFT adapter, as found on the hub (no persona-cli record)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY).path)
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(path)


@pytest.fixture(scope="module")
def cache(prepared_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache with org/adapters (main and tag v1: two commits, different weights
    in the same subfolder) and org/tiny (a model, tiny-random's files)."""
    root = tmp_path_factory.mktemp("hf_cache")
    repo = root / "models--org--adapters"
    for ref, sha in (("main", SHA_MAIN), ("v1", SHA_V1)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
        _adapter(repo / "snapshots" / sha / SUB, seed=int(sha[0]))
    model = root / "models--org--tiny"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text(SHA_MAIN)
    shutil.copytree(resolve(TINY).path, model / "snapshots" / SHA_MAIN)
    return root


@pytest.fixture
def offline_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_fake_cache_resolves_revision_and_subfolder(offline_cache: Path) -> None:
    main = hub.resolve(f"hf:org/adapters:{SUB}")
    v1 = hub.resolve(f"hf:org/adapters@v1:{SUB}")
    pinned = hub.resolve(f"hf:org/adapters@{SHA_V1}:{SUB}")
    assert (main.commit, v1.commit, pinned.commit) == (SHA_MAIN, SHA_V1, SHA_V1)
    assert v1.path == offline_cache / "models--org--adapters" / "snapshots" / SHA_V1 / SUB
    assert (v1.path / "adapter_config.json").is_file()
    with pytest.raises(UserError, match="no folder 'nope' at commit"):
        hub.resolve("hf:org/adapters:nope")


def test_offline_error_is_one_line(offline_cache: Path, tmp_path: Path) -> None:
    args = ["eval-markers", "--model", TINY, "--adapter", "hf:org/missing@v3:x",
            "--personas-ids", "villain", "--samples", "1", "--max-new-tokens", "2",
            "--out", str(tmp_path / "e")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --adapter hf:org/missing@v3:x: not in"
    ), r.stderr
    assert "HF_HUB_OFFLINE=1" in lines[0] and not (tmp_path / "e").exists()


def test_eval_with_hub_model_and_adapter_records_commits(cache: Path, tmp_path: Path) -> None:
    """The real command in a fresh process, offline, with HF_HUB_CACHE pointing at the fake
    cache: the model and the adapter come from it; the manifest records the commits."""
    out = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["eval-markers", "--model", "hf:org/tiny", "--adapter", f"hf:org/adapters@v1:{SUB}",
            "--personas-ids", "villain", "--samples", "1", "--max-new-tokens", "2",
            "--questions", str(bundled.eval_questions_file()), "--out", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "persona_cli", *args], env=env, capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = read_json(out / "manifest.json")
    assert (manifest["model"]["kind"], manifest["model"]["revision"]) == ("hf", SHA_MAIN)
    assert manifest["model"]["spec"] == "hf:org/tiny"
    adapter = manifest["adapters"][0]
    assert adapter["hub"] == {"repo": "org/adapters", "revision": "v1", "subfolder": SUB,
                              "commit": SHA_V1}  # fmt: skip
    assert adapter["spec"] == f"hf:org/adapters@v1:{SUB}"
    assert adapter["path"].endswith(f"snapshots/{SHA_V1}/{SUB}")


def _run_bytes(run: Path) -> bytes:
    """Every file of a run directory, gzip members decompressed."""
    out = b""
    for p in sorted(run.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            out += gzip.decompress(data) if p.suffix == ".gz" else data
    return out


def test_push_to_hub_uploads_the_adapter_and_never_records_the_token(
    prepared_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    calls: list[tuple[Path, hub.PushTarget, str]] = []
    fail = [True]

    def upload(folder: Path, target: hub.PushTarget, message: str) -> str:
        assert os.environ["HF_TOKEN"] == TOKEN  # huggingface_hub would read it from here
        calls.append((folder, target, message))
        if fail[0]:
            raise ConnectionError(f"cannot reach the hub (token {TOKEN[:6]}...)")
        return "c0ffee" * 6 + "abcd"

    monkeypatch.setattr(hub, "upload_folder", upload)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(bundled.benign_dataset_file().read_text().splitlines(True)[:4]))
    out = tmp_path / "run"
    args = ["train-sft", "--model", TINY, "--data", str(data), "--max-steps", "1",
            "--per-device-batch", "2", "--grad-accum", "1", "--max-length", "64",
            "--push-to-hub", "org/organisms:runs/seed1", "--out", str(out)]  # fmt: skip
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 1 and "upload failed (ConnectionError" in failed.stderr
    assert not (out / "DONE").exists() and (out / "adapter" / "adapter_model.safetensors").is_file()
    trained = (out / "train_summary.json").stat().st_mtime_ns
    fail[0] = False
    r = CliRunner().invoke(app, args)  # pushes without retraining
    assert r.exit_code == 0, r.output
    assert (out / "train_summary.json").stat().st_mtime_ns == trained
    assert [(c[0], c[1]) for c in calls] == [
        (out / "adapter", hub.PushTarget("org/organisms", "runs/seed1"))
    ] * 2
    manifest = read_json(out / "manifest.json")
    assert manifest["hub_push"] == {"repo": "org/organisms", "subfolder": "runs/seed1",
                                    "commit": "c0ffee" * 6 + "abcd"}  # fmt: skip
    assert TOKEN.encode() not in _run_bytes(out)
    assert TOKEN[:6].encode() not in _run_bytes(out)
