"""The exit codes of every `appt` verb, and the error that carries one.

Scripts branch on these codes, so they are contract (README, `appt --help`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the command was rejected or failed; a dependency unreachable; a port taken
EXIT_USAGE = 2  # a bad flag or argument, an unknown id, no store where APPT_STORE points
EXIT_CONFIG = 3  # a bad APPT_* variable
EXIT_TIMEOUT = 4  # no result within `send --wait`


class CliError(Exception):
    """An ordinary mistake or an unreachable dependency: one line saying what to do, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
