"""One exception type for every error a user can hit: one line saying what, one saying how to fix."""

from __future__ import annotations


class UserError(Exception):
    """An expected failure: printed as one line (plus a fix hint), never as a traceback.

    exit_code follows the CLI convention: 1 = the thing failed, 2 = bad usage (flags, config).
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class UsageError(UserError):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=2)
