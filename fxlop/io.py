"""Writing files safely: every file fxlop writes goes through :func:`atomic_write`, and every path it
will write is checked with :func:`check_writable` before any work starts.

An atomic write goes to a temporary file in the target's own directory, is flushed and fsynced, and
is then renamed over the target (``os.replace``, atomic on POSIX and Windows): a reader, a crash, a
full disk or an interrupt leaves either the old file or the new one, never a torn one.  A failed
write removes its temporary file and leaves the target as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import FxlopError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write a whole file atomically: a temporary file next to ``path``, renamed over it on a clean exit.

    The new file keeps the permissions of the file it replaces, or gets those a plain ``open`` would
    give it (``0o666`` less the umask).  A symbolic link is written through: its target gets the new
    content and the link stays.

    Args:
        path: the file to write; its directory is created if missing.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).

    Yields:
        The open file object.

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: the write failed (disk full, no permission); ``path`` is untouched then.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', got {mode!r}")
    path = Path(os.path.realpath(path))  # a symlink is written through, not replaced by a file
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        permissions = path.stat().st_mode & 0o7777
    except OSError:
        permissions = 0o666 & ~UMASK
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        handle = os.fdopen(descriptor, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
    except BaseException:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    try:
        with handle:
            with contextlib.suppress(OSError):
                os.fchmod(handle.fileno(), permissions)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def save(obj, path: str | os.PathLike) -> None:
    """Save ``obj`` with ``torch.save`` through :func:`atomic_write`.

    Args:
        obj: what to save (a module, a state_dict, a checkpoint payload).
        path: the file to write.

    Raises:
        OSError: the write failed (a full disk: ``ENOSPC``); ``path`` is untouched.  torch's writer
            turns the OSError of a failed write into a RuntimeError without its reason; the OSError is
            raised instead.
    """
    with atomic_write(path) as handle:
        recording = _Recording(handle)
        try:
            torch.save(obj, recording)
        except RuntimeError as error:
            if recording.error is not None:
                raise recording.error from error
            raise


class _Recording:
    """A file object that keeps the first OSError its ``write`` raised."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) through :func:`atomic_write`.

    Args:
        path: the file to write.
        text: its whole new content.

    Raises:
        OSError: the write failed; ``path`` is untouched.
    """
    with atomic_write(path, "w") as handle:
        handle.write(text)


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that the file ``path`` can be written: it is not a directory, and a file
    can be created in its directory (or, where that does not exist yet, in the nearest existing one:
    the directories are made when the file is written).  A probe file is created and removed, since
    permission bits say nothing for root and nothing about read-only or virtual file systems (/proc).

    Args:
        path: the file that will be written.
        what: how the message names it (``"--out"``, ``"checkpoint_path"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FxlopError: ``path`` cannot be written, with the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise FxlopError(f"{what} {path} is a directory, not a file")
    check_directory_writable(path.parent, what, shown=path)
    return path


def check_directory_writable(directory: str | os.PathLike, what: str, shown: str | os.PathLike | None = None) -> Path:
    """Check that files can be created in ``directory`` (or in its nearest existing parent, if it does
    not exist yet).

    Args:
        directory: the directory files will be written to.
        what: how the message names it.
        shown: the path the message shows (default ``directory``).

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        FxlopError: a part of the path is a file, or no file can be created there.
    """
    directory = Path(directory)
    shown = directory if shown is None else shown
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FxlopError(f"{what} {shown}: {existing} is a file, not a directory")
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".fxlop-write-check.")
    except OSError as error:
        raise FxlopError(f"{what} {shown} cannot be written: {error.strerror or error} in {existing}") from error
    os.close(descriptor)
    os.unlink(probe)
    return directory


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file, through links and other spellings of the path too.

    Args:
        first: a path, existing or not.
        second: another path.

    Returns:
        ``True`` when both name one file; a path that does not exist is compared by its resolved name.
    """
    try:
        return os.path.samefile(first, second)
    except OSError:
        return Path(first).resolve() == Path(second).resolve()


def check_file(path: str | os.PathLike, what: str, expected: str = "a file", error: type = FxlopError) -> Path:
    """Check that ``path`` is an existing file to read, neither a directory nor missing.

    Args:
        path: the file that will be read.
        what: how the message names it (``"--weights"``, ``"checkpoint"``).
        expected: what the message says it should be (``"a model file saved by torch.save"``).
        error: the FxlopError class to raise.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FxlopError: ``path`` is a directory or does not exist (as ``error``).
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not {expected}")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    return path


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it, which is not thread-safe)
UMASK = _read_umask()


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; a file system that cannot sync a directory (Windows) is left as is."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
