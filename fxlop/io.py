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
    """Open a temporary file next to ``path`` for writing; on a clean exit of the block it replaces
    ``path`` (created with the permissions a plain ``open`` would give it).

    Args:
        path: the file to write; its directory is created if missing.
        mode: ``"wb"`` (bytes) or ``"w"`` (text, UTF-8).

    Yields:
        The open file object.

    Raises:
        OSError: the write failed (disk full, no permission); ``path`` is untouched then.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole file: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(descriptor, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
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
    """``torch.save(obj, path)`` through :func:`atomic_write`.

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
    """Write ``text`` to ``path`` through :func:`atomic_write`."""
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
    """Whether two paths name the same file (through links too); a missing path is compared by its
    resolved name."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return Path(first).resolve() == Path(second).resolve()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
