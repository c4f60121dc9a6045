"""Every file stoker writes goes through here: atomic, never through a symlink, never half-written.

A reader sees the old file or the whole new one. The temporary file is made by ``tempfile.mkstemp``
in the target's folder (``O_CREAT | O_EXCL``, a random name, mode 0600), so a name planted in a
shared folder cannot redirect the write; ``os.replace`` then swaps the name itself, so a symlink at
the target is replaced, not followed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``write(handle)`` writes, atomically.

    The folder must exist (stoker creates cache folders itself, where the docs say). Raises the
    ``OSError`` of a full disk or a read-only folder after removing the temporary file, so a failed
    write leaves nothing behind that could read as valid.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes 0600; give the file the mode a plain open() would, under the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``atomic_write`` for a bytes payload."""

    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``atomic_write`` for text, as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))
