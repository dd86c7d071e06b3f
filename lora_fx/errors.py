"""The one error type lorafx raises for bad input: it says what, where and what to do."""

from __future__ import annotations

from collections.abc import Iterable
from difflib import SequenceMatcher


class LoraFxError(Exception):
    """A user-facing error. ``str(err)`` is one line; the CLI prints it and exits non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class LoraFxWarning(UserWarning):
    """Something the user should know (e.g. ONNX Runtime fell back to the CPU); the CLI prints
    it as one ``warning:`` line."""


def some(names: Iterable[str], near: str | Iterable[str] | None = None, shown: int = 3) -> str:
    """At most ``shown`` of ``names`` and "+N more", the closest to ``near`` first (a name or
    several): what an error line lists instead of every name."""
    items = list(dict.fromkeys(names))
    keys = [near] if isinstance(near, str) else list(near or [])
    if keys:
        def score(name: str) -> float:
            leaf = name.rsplit(".", 1)[-1]
            return max(max(SequenceMatcher(None, k, name).ratio(),
                           SequenceMatcher(None, k, leaf).ratio()) for k in keys)

        items.sort(key=score, reverse=True)
    head = ", ".join(items[:shown]) or "none"
    return head + (f" +{len(items) - shown} more" if len(items) > shown else "")
