"""Open dataset inputs safely: only regular files, of bounded size, at paths that stay inside their roots.

Every image, caption and cache stoker reads goes through `open_regular`: a FIFO would block the
scan forever, ``/dev/zero`` would fill memory, and a device or socket is never an image. The file
is opened with ``O_NONBLOCK`` (so a FIFO without a writer cannot block the open) and checked with
``fstat`` on the open descriptor, so a name swapped between check and open changes nothing.

`inside` decides whether a path, with its symlinks followed, stays under a root: a metadata key
``../../secret`` or a symlink to ``/home/someone/photo.jpg`` leaves the dataset and is reported.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = [
    "CAPTION_LIMIT_BYTES",
    "UnusableFile",
    "inside",
    "lexically_inside",
    "open_regular",
    "os_reason",
    "read_bounded",
]

CAPTION_LIMIT_BYTES = 1 << 20
"""Largest caption file read (1 MiB): far above any prompt, far below what hurts memory."""


class UnusableFile(Exception):
    """A path that must not be read as data; ``reason`` says why in a few plain words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def os_reason(err: OSError) -> str:
    """Plain words for the OS errors a dataset walk meets."""
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno == errno.ENOENT:
        return "file not found"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EISDIR:
        return "is a directory"
    return err.strerror or type(err).__name__


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def open_regular(path: str | os.PathLike[str], *, limit_bytes: int | None = None) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file of at most ``limit_bytes``.

    Raises:
        UnusableFile: it is a FIFO, device, socket or directory, or larger than the limit.
        OSError: it cannot be opened (missing, permission, symlink loop); `os_reason` names it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnusableFile(_kind_of(info.st_mode))
        if limit_bytes is not None and info.st_size > limit_bytes:
            raise UnusableFile(f"is {info.st_size} bytes, over the limit of {limit_bytes}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike[str], limit_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``limit_bytes`` (see `open_regular`)."""
    with open_regular(path, limit_bytes=limit_bytes) as handle:
        # Read one byte past the limit: a file that grew after fstat is still caught.
        data = handle.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise UnusableFile(f"is more than {limit_bytes} bytes")
    return data


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path``, with every symlink followed, lies under ``root`` (also followed)."""
    real = os.path.realpath(path)
    base = os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def lexically_inside(path: str, root: str) -> bool:
    """Whether ``path`` stays under ``root`` without following anything (``..`` climbs out)."""
    norm = os.path.normpath(path)
    base = os.path.normpath(root)
    return norm == base or norm.startswith(base.rstrip(os.sep) + os.sep)
