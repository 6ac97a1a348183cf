"""Errors a user can cause, and the exit codes the command layer maps them to.

A `UserError` carries one line that names the file, line or option at fault. The CLI prints it as
`error: <line>` on stderr and exits with `exit_code`; no traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 2  # malformed file, unknown id, bad option value (same code click uses for usage)
EXIT_PROTOCOL = 3  # runs refused for comparison because their protocols differ
EXIT_CHECK_FAILED = 1  # an acceptance check ran and failed


class UserError(Exception):
    """An error the user can fix; its message is a single line."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(UserError):
    """A malformed input file: the message reads `FILE:LINE: what is wrong`."""

    def __init__(self, path: str | Path, what: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.what = what
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {what}")
