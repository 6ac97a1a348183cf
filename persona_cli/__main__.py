"""`python -m persona_cli` is the same as the `persona-cli` console script."""

from persona_cli.cli import main

if __name__ == "__main__":
    main()
