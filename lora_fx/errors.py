"""The one error type lorafx raises for bad input: it says what, where and what to do."""

from __future__ import annotations


class LoraFxError(Exception):
    """A user-facing error. ``str(err)`` is one line; the CLI prints it and exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class LoraFxWarning(UserWarning):
    """Something the user should know (e.g. ONNX Runtime fell back to the CPU); the CLI prints
    it as one ``warning:`` line."""
