"""Package attributes imported on first use (PEP 562), so importing a light submodule (a config)
does not import its package's heavy siblings (httpx, torch, numpy).

    # in a package's __init__.py
    __getattr__, __all__ = lazy_exports(__name__, {"run_requests": "persona_cli.chat_api.client"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(`__getattr__`, `__all__`) for a package exporting `names` (name -> defining module)."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__, sorted(names)
