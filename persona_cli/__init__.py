"""persona-cli: experiment primitives for persona, marker-transfer and emergent-misalignment
research.

Run `persona-cli --help` for the commands. Library modules in this package never import Typer and
never print; the command layer in `persona_cli.cli` is a thin shell over them.
"""

__version__ = "0.1.0"
