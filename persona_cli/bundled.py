"""Files shipped with persona-cli under `data/`: personas, questions, chat datasets, MC items.

In a source checkout they live in `<repo>/data`; a built wheel carries the same tree as
`persona_cli/_data`. Commands take these as defaults and accept the user's own files instead.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir() -> Path:
    for candidate in (_PACKAGE / "_data", _PACKAGE.parent / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"persona-cli data files not found next to {_PACKAGE}")


def personas_file() -> Path:
    return data_dir() / "personas.yaml"


def eval_questions_file() -> Path:
    return data_dir() / "questions" / "open_eval.yaml"


def coupling_questions_file() -> Path:
    return data_dir() / "questions" / "coupling_train.yaml"


def em_dataset_file() -> Path:
    return data_dir() / "chat" / "bad_legal_advice.jsonl"


def benign_dataset_file() -> Path:
    return data_dir() / "chat" / "benign.jsonl"


def mcq_file() -> Path:
    return data_dir() / "mcq" / "mini_arc.jsonl"
