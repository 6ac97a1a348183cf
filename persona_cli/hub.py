"""Hugging Face Hub specs: read adapters and models from a repository, push adapters to one.

A hub spec is `hf:ORG/REPO[@REVISION][:SUBFOLDER]`:

    hf:superkaiba1/explore-persona-space:single_token_multi_source/evil_ai_seed42
    hf:org/model-organisms@v1.2:checkpoints/checkpoint-250

`resolve` fetches the snapshot (only the subfolder's files) into the ordinary Hugging Face cache
(`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`) and returns the local directory with the
commit sha the revision resolved to, which manifests record. With `HF_HUB_OFFLINE=1` the cache
alone answers: `refs/REVISION` names the commit, `snapshots/SHA/SUBFOLDER` holds the files. A
spec the cache cannot answer offline, or the hub cannot answer online, is one line, exit 2.

`push(folder, target)` uploads a finished adapter directory (`--push-to-hub REPO[:SUBFOLDER]`)
with the token huggingface_hub reads from the environment (`HF_TOKEN`) or its own login; the
token never passes through persona-cli, so no artifact can hold it. Returns the commit sha.

    python -c "from persona_cli import hub; print(hub.parse('hf:org/repo@v1:sub'))"
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persona_cli.errors import UserError

PREFIX = "hf:"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubSpec:
    repo: str  # ORG/REPO
    revision: str | None  # branch, tag or commit as given; None: main
    subfolder: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HubSnapshot:
    spec: HubSpec
    path: Path  # the local directory (snapshot / subfolder)
    commit: str  # the commit sha the revision resolved to

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "commit": self.commit, "path": str(self.path)}


def is_hub_spec(text: str) -> bool:
    return str(text).startswith(PREFIX)


def parse(text: str, option: str = "--adapter") -> HubSpec:
    """`hf:ORG/REPO[@REVISION][:SUBFOLDER]` -> HubSpec; a malformed spec is one line naming it."""
    if not is_hub_spec(text):
        raise UserError(f"{option} {text!r}: a hub spec starts with {PREFIX!r}")
    body = text[len(PREFIX) :]
    head, _, subfolder = body.partition(":")
    repo, at, revision = head.partition("@")
    subfolder = subfolder.strip("/")
    if not _REPO.match(repo) or (at and not revision) or (":" in body and not subfolder):
        raise UserError(
            f"{option} {text!r}: expected hf:ORG/REPO[@REVISION][:SUBFOLDER], "
            "e.g. hf:org/repo@main:runs/seed42"
        )
    return HubSpec(repo, revision or None, subfolder or None)


def resolve(text: str, option: str = "--adapter") -> HubSnapshot:
    """Download (or, offline, find in the cache) the spec's snapshot; see the module doc."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = parse(text, option)
    patterns = [f"{spec.subfolder}/*", f"{spec.subfolder}/**"] if spec.subfolder else None
    try:
        root = Path(snapshot_download(spec.repo, revision=spec.revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{option} {text}: not in the local Hugging Face cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network); download it on a machine online, or copy its "
            "cache folder here"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{option} {text}: revision {spec.revision!r} not found") from None
    except RepositoryNotFoundError:
        raise UserError(f"{option} {text}: repository {spec.repo!r} not found") from None
    path = root / spec.subfolder if spec.subfolder else root
    if not path.is_dir():
        raise UserError(f"{option} {text}: no folder {spec.subfolder!r} at commit {root.name}")
    return HubSnapshot(spec, path, root.name)


# ----------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class PushTarget:
    repo: str
    subfolder: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_push_target(text: str) -> PushTarget:
    """`--push-to-hub REPO[:SUBFOLDER]` (an `hf:` prefix is accepted too)."""
    body = text[len(PREFIX) :] if is_hub_spec(text) else text
    repo, _, subfolder = body.partition(":")
    subfolder = subfolder.strip("/")
    if not _REPO.match(repo) or "@" in body or (":" in body and not subfolder):
        raise UserError(f"--push-to-hub {text!r}: expected ORG/REPO[:SUBFOLDER]")
    return PushTarget(repo, subfolder or None)


def upload_folder(folder: Path, target: PushTarget, message: str) -> str:
    """Upload `folder` to the target repository; returns the new commit's sha. (Tests replace
    this function to check the wiring without a token or a network.)"""
    from huggingface_hub import HfApi

    api = HfApi()  # the token: HF_TOKEN or `hf auth login`, read by huggingface_hub itself
    api.create_repo(target.repo, exist_ok=True, private=True)
    info = api.upload_folder(
        repo_id=target.repo,
        folder_path=str(folder),
        path_in_repo=target.subfolder or "",
        commit_message=message,
    )
    return str(info.oid)


def push(folder: Path, target: PushTarget, message: str) -> dict[str, Any]:
    """Upload `folder` to `target`; returns the record a manifest keeps (no token)."""
    try:
        commit = upload_folder(folder, target, message)
    except UserError:
        raise
    except Exception as e:  # network, permission, missing token: the run stays unfinished
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"--push-to-hub {target.repo}: upload failed ({type(e).__name__}: {first}); the "
            "trained adapter is kept, re-run the same command to push it",
            exit_code=1,
        ) from None
    return {**target.to_dict(), "commit": commit}
