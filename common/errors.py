"""The one error type for problems a user can fix.

A :class:`FedscanError` names the file, field or site at fault and says what to do.
The CLI prints it without a traceback and exits non-zero; bugs still raise normally.
"""

from __future__ import annotations


class FedscanError(Exception):
    """A problem the user can fix: bad input, a missing folder, a wrong config value."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"
