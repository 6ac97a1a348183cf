"""The README's set-up commands and what CI runs must not drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    commands = _setup_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
    assert "pytest" in commands[1] and commands[0].endswith("just marker-quick")


def test_readme_main_command_names_a_recipe_that_exists() -> None:
    recipe = re.search(r"just (\S+)$", _setup_commands()[0]).group(1)
    justfiles = [ROOT / "justfile", *sorted((ROOT / "just").glob("*.just"))]
    pattern = re.compile(rf"^{re.escape(recipe)}\b.*:", flags=re.M)
    assert any(pattern.search(f.read_text()) for f in justfiles)
