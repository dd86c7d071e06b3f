"""Atomic file writes: write beside the target under a temporary name, then rename into place.

A failed or killed write leaves the previous content whole:

- a file (``atomic_path``) is written to ``.NAME.PID.RANDOM.tmp`` in the target's directory,
  fsynced, optionally verified, then renamed onto the target (``os.replace`` is atomic within
  one filesystem on POSIX and Windows);
- a directory (``atomic_dir``, an adapter: config + weights that must match) is written as a
  whole new directory beside the target and swapped in with one atomic ``renameat2(...,
  RENAME_EXCHANGE)`` on Linux, files it does not replace hard-linked over first; elsewhere
  each file is renamed in turn.

A killed process cannot remove its temporary; the next write to the same target removes the
temporaries of processes that no longer run. Missing parent folders are made once there is
something to write (``made_dirs``) and removed again when the write fails. Disk full, read-only
and uncreatable directories become one-line ``LoraFxError`` s.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from .errors import LoraFxError

Verify = Callable[[Path], None]  # raises (LoraFxError) when the written temporary is wrong


def check_writable_dir(directory: Path) -> None:
    """Refuse early when ``directory`` does not exist, is a file, or cannot be written."""
    if not directory.is_dir():
        blocker = next((p for p in [directory, *directory.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise LoraFxError(f"output directory {directory} cannot be created: {blocker} is a "
                              "file; choose another output path")
        raise LoraFxError(f"output directory {directory} does not exist: create it first")
    if not os.access(directory, os.W_OK):
        raise LoraFxError(f"output directory {directory} is not writable (permissions or a "
                          "read-only file system): choose another output path")


def check_creatable_dir(directory: Path) -> None:
    """Refuse early when ``directory`` can be neither written nor made: missing folders are
    fine where the nearest existing one is a writable directory (``made_dirs`` makes them)."""
    existing = next((p for p in [directory, *directory.parents] if p.exists()), None)
    if existing is None or existing == directory:
        check_writable_dir(directory)
        return
    if not existing.is_dir():
        raise LoraFxError(f"output directory {directory} cannot be created: {existing} is a "
                          "file; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LoraFxError(f"output directory {directory} cannot be created: {existing} is not "
                          "writable; choose another output path")


@contextlib.contextmanager
def made_dirs(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Make ``directory`` and its missing parents for a write that follows in the ``with``
    block; when the block fails, remove the ones made here that are still empty, so a failed
    write leaves no folder behind."""
    directory = Path(directory)
    check_creatable_dir(directory)
    missing = [p for p in [directory, *directory.parents] if not p.exists()]  # deepest first
    try:
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
        yield directory
    except BaseException as err:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: never what another writer put there
        mapped = io_error(directory, err)
        if mapped is None:
            raise
        raise mapped from err


def check_output_file(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Refuse before any work: ``path`` a directory, its directory read-only or impossible to
    make, or an existing file without ``force`` (the one overwrite policy of every command)."""
    path = Path(path)
    if path.is_dir():
        raise LoraFxError(f"{path} is a directory: pass a file path such as "
                          f"{path / 'model.onnx'}")
    check_creatable_dir(path.parent.resolve())
    if path.exists() and not force:
        raise LoraFxError(f"{path} exists: pass --force (force=True) to overwrite it")
    return path


def io_error(target: Path, err: BaseException) -> LoraFxError | None:
    """The LoraFxError for an I/O failure while writing ``target``; None if ``err`` is not one.

    safetensors reports I/O errors as ``SafetensorError(... (os error N))``, not OSError.
    """
    if isinstance(err, LoraFxError):
        return None
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
    else:
        found = re.search(r"os error (\d+)", str(err))
        if type(err).__name__ != "SafetensorError" or not found:
            return None
        code = int(found.group(1))
        reason = os.strerror(code)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        advice = "free some space or choose another path"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a writable path"
    else:
        advice = "check the path and try again"
    return LoraFxError(f"could not write {target}: {reason}; nothing was changed: {advice}")


# --- temporaries ------------------------------------------------------------------------------

def temp_path(parent: Path, name: str) -> Path:
    return parent / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def sweep_stale(parent: Path, name: str) -> int:
    """Remove temporaries of ``name`` in ``parent`` left by processes that no longer run."""
    return sweep_dead(parent, re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]+\.tmp"))


def sweep_dead(parent: Path, pattern: re.Pattern[str], keep: Container[str] = ()) -> int:
    """Remove the entries of ``parent`` whose name ``pattern`` matches, with the writer's PID
    as its first group, when that process no longer runs and the name is not in ``keep``."""
    if os.name == "nt":  # os.kill(pid, 0) is not a probe on Windows
        return 0
    removed = 0
    for entry in parent.iterdir() if parent.is_dir() else []:
        found = pattern.fullmatch(entry.name)
        if not found or entry.name in keep or _alive(int(found.group(1))):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed += 1
    return removed


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(target: Path, default: int) -> int:
    """The target's permission bits if it exists, else ``default`` less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return default & ~_umask()


def _fsync(path: Path) -> None:
    if path.is_dir():
        if os.name == "nt":
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for item in sorted(root.rglob("*")):
        if not item.is_symlink():
            _fsync(item)
    _fsync(root)


# --- one file ---------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], verify: Verify | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    The caller writes the complete file at the yielded path; ``verify(tmp)`` may check it.
    On any exception the temporary is removed and ``target`` is left as it was; missing parent
    folders are made for the write and removed again on failure.
    """
    target = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    parent = target.parent.resolve()
    check_creatable_dir(parent)
    if target.is_dir():
        raise LoraFxError(f"{target} is a directory: pass a file path")
    with made_dirs(parent):
        sweep_stale(parent, target.name)
        tmp = temp_path(parent, target.name)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield tmp
            if verify is not None:
                verify(tmp)
            _fsync(tmp)
            os.chmod(tmp, _mode(target, 0o666))
            os.replace(tmp, target)
            _fsync(parent)
        except BaseException as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            mapped = io_error(target, err)
            if mapped is None:
                raise
            raise mapped from err


# --- one directory ----------------------------------------------------------------------------

def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (symbolic links copied as links)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for item in src.iterdir():
            _link_tree(item, dst / item.name)
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EBUSY):
        return False  # not supported here (file system, mount point): rename file by file
    raise OSError(code, os.strerror(code), str(b))


def _commit_dir(tmp: Path, target: Path) -> None:
    """Make ``target`` hold ``tmp``'s files plus the target's other files, in one step."""
    if not target.exists():
        os.chmod(tmp, _mode(target, 0o777))
        os.rename(tmp, target)
        return
    new = sorted(item.name for item in tmp.iterdir())
    for item in target.iterdir():
        if item.name not in new:
            _link_tree(item, tmp / item.name)
    os.chmod(tmp, _mode(target, 0o777))
    if exchange(tmp, target):  # tmp now holds the previous content; the caller removes it
        return
    for name in new:  # fallback: each file atomically, in turn
        os.replace(tmp / name, target / name)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], force: bool = False,
               verify: Verify | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``.

    Files of an existing ``target`` that the new content does not replace are kept; missing
    parent folders are made. On failure (or ``verify(tmp)`` raising) nothing in ``target``
    changes and no folder made here is left.
    """
    target = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    parent = target.parent.resolve()
    check_creatable_dir(parent)
    if target.exists() and not target.is_dir():
        raise LoraFxError(f"{target} exists and is not a directory: choose another output path")
    with made_dirs(parent):
        sweep_stale(parent, target.name)
        tmp = temp_path(parent, target.name)
        try:
            tmp.mkdir(mode=0o700)
            yield tmp
            if verify is not None:
                verify(tmp)
            _fsync_tree(tmp)
            _commit_dir(tmp, target)
            _fsync(parent)
        except BaseException as err:
            mapped = io_error(target, err)
            if mapped is None:
                raise
            raise mapped from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
