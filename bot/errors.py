"""Exceptions that carry the text a user should see.

Code that refuses something raises a `UserError` with a sentence that says what is wrong and what to do; the one
error handler in `bot.slack.errors` shows it where the user is (an ephemeral message, a modal error). Anything
else is unexpected: the handler logs it with a short reference id and shows only that id.
"""

from __future__ import annotations

import secrets


class RelaybotError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(RelaybotError):
    """A setting is missing or wrong; start-up stops with this one line."""


class UserError(RelaybotError):
    """A refusal or failure caused by what a user asked for; `str(self)` is safe to show them."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAllowed(UserError):
    """The user may not do this."""


class NotFound(UserError):
    """The thing named does not exist in this workspace."""


class WorkflowError(RelaybotError):
    """A workflow file is invalid; carries every problem with its file and line."""

    def __init__(self, problems: list[WorkflowProblem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


class WorkflowProblem:
    __slots__ = ("file", "line", "message")

    def __init__(self, *, file: str, line: int | None, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"WorkflowProblem({self!s})"


class ExpressionError(RelaybotError):
    """A CEL expression failed to compile or to evaluate."""


class StepFailure(RelaybotError):
    """An action failed in a way its step should report (already masked, safe for the thread)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class DecryptionError(RelaybotError):
    """A ciphertext failed authentication: tampered, moved to another row, or its key is gone."""


def reference_id() -> str:
    """A short id a user can quote and an operator can find in the log."""
    return secrets.token_hex(4)
