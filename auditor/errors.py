"""Domain exceptions. Each carries the exit code the CLI uses.

Messages say what was found, what was expected and, where possible, how to fix it,
on one line, naming the file or field at fault.
"""

from __future__ import annotations


class AuditorError(Exception):
    """Bad input: a file or field that is missing, malformed or out of range (exit 2)."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class VerificationError(Exception):
    """A signed report does not verify (exit 1)."""

    exit_code = 1


class GateFailure(Exception):
    """A release gate failed (exit 3)."""

    exit_code = 3
