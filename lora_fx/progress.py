"""Progress on stderr for the long stages: capture, merge, export, verification.

``with stage("capturing the model"):`` around a stage; stages nest (the innermost is shown).
Off by default (the Python API prints nothing); the CLI turns it on when stderr is a terminal
and ``--json`` is not given. Once a stage has run for ``DELAY`` seconds, a spinner line
``⠹ capturing the model (3 s)`` is redrawn in place on stderr and erased when the outermost
stage ends, so a finished command leaves only its own output.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

DELAY, TICK = 1.0, 0.1
FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class _Spinner:
    """The one spinner thread and the stack of stages it shows."""

    def __init__(self) -> None:
        self.enabled = False
        self.stream: TextIO | None = None
        self.stages: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.start = 0.0
        self.drawn = False

    def push(self, name: str) -> None:
        with self.lock:
            self.stages.append(name)
            if len(self.stages) > 1:
                return
            self.start, self.drawn = time.monotonic(), False
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(self.done,), daemon=True)
            self.thread.start()

    def pop(self) -> None:
        with self.lock:
            self.stages.pop()
            if self.stages:
                return
            self.done.set()
            thread = self.thread
        if thread is not None:
            thread.join()
        self._erase()

    def _run(self, done: threading.Event) -> None:
        if done.wait(DELAY):
            return
        frame = 0
        while not done.is_set():
            with self.lock:
                name = self.stages[-1] if self.stages else ""
                self._write(f"\r{FRAMES[frame % len(FRAMES)]} {name} "
                            f"({time.monotonic() - self.start:.0f} s)\x1b[K")
                self.drawn = True
            frame += 1
            done.wait(TICK)

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def _erase(self) -> None:
        if self.drawn:
            self._write("\r\x1b[K")
            self.drawn = False


_SPINNER = _Spinner()


def enable(on: bool = True, stream: TextIO | None = None) -> None:
    """Show stages on ``stream`` (default: stderr) from now on (``on=False``: stop)."""
    _SPINNER.enabled, _SPINNER.stream = on, stream


def clear() -> None:
    """Erase the spinner's line (the next tick redraws it): call before printing a line."""
    with _SPINNER.lock:
        _SPINNER._erase()


def enabled() -> bool:
    return _SPINNER.enabled


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Show ``name`` while the block runs (when enabled and past ``DELAY`` seconds)."""
    if not _SPINNER.enabled:
        yield
        return
    _SPINNER.push(name)
    try:
        yield
    finally:
        _SPINNER.pop()
