"""User-facing errors: one line, an exit code, no traceback (unless --debug)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. ``str(e)`` is the one line shown; ``exit_code`` the status."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ImageError(UserError):
    exit_code = 2


class ModelLoadError(UserError):
    exit_code = 2


class OutputError(UserError):
    exit_code = 2
