"""Atomic file writes: write beside the target under a temporary name, then rename into place.

A failed or killed write leaves the previous file whole: ``os.replace`` is atomic on POSIX and
Windows within one filesystem, and the temporary file lives in the target's own directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LoraFxError


def check_writable_dir(directory: Path) -> None:
    """Refuse early when ``directory`` does not exist or cannot be written."""
    if not directory.is_dir():
        raise LoraFxError(f"output directory {directory} does not exist: create it first")
    if not os.access(directory, os.W_OK):
        raise LoraFxError(f"output directory {directory} is not writable: choose another path")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    check_writable_dir(target.parent.resolve())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LoraFxError(f"could not write {target}: {err.strerror or err}: free space or "
                          "choose another path") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success move its files into
    ``target`` (created if missing), each file by an atomic rename.

    Files of ``target`` that the new content does not replace are kept. On failure nothing in
    ``target`` changes.
    """
    target = Path(target)
    parent = target.parent.resolve()
    check_writable_dir(parent)
    if target.exists() and not target.is_dir():
        raise LoraFxError(f"{target} exists and is not a directory: choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        for item in sorted(tmp.iterdir()):
            with open(item, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(item, target / item.name)
    except OSError as err:
        raise LoraFxError(f"could not write {target}: {err.strerror or err}: free space or "
                          "choose another path") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
