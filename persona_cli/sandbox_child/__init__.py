"""Programs the sandbox runs in child processes, kept as real files so they are linted and read.

They run under `python -I -S -c <source>` (often a system Python, as an unprivileged uid that
cannot read the virtual environment), so they import the standard library only and are never
imported by persona-cli itself: `persona_cli.sandbox` reads their source with `source()`.
"""

from __future__ import annotations

from importlib import resources


def source(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
