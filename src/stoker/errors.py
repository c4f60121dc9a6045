"""The one tree of stoker errors and warnings.

- ``StokerError``: base of everything stoker raises on purpose.
  - ``ConfigError``: a dataset config, folder name or setting that cannot be used (also a ``ValueError``).
  - ``DatasetError``: the data itself cannot be loaded (missing folder, empty dataset, bad files under
    ``on_error="raise"``).
  - ``CacheError``: a scan or tuning cache cannot be read or written.
  - ``WorkerFailed`` (also a ``RuntimeError``): a loader worker died; names it and what it loaded.
  - ``SharedMemoryFull`` (also a ``RuntimeError``): ``/dev/shm`` is too small for the batches.
  - ``LoaderTimeout`` (also a ``RuntimeError``): a batch took longer than the loader's ``timeout``.
- ``StokerWarning``: every warning stoker issues, so users can filter them in one line.
  - ``InputBoundWarning``: the training loop waits for data (``stoker.monitor``); it depends on
    how busy the machine is, so it has its own class to filter (the test suite ignores it).
- ``Problem``: one input file that could not be used as it is, as data (kind, subset, path, action),
  so reports count problems from fields, never from message text.

Every message says what went wrong, where (file, table, key, image path) and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProblemKind = Literal[
    "bad_image",
    "missing_image",
    "outside_root",
    "not_regular_file",
    "missing_caption",
    "bad_caption",
    "no_conditioning",
    "too_small",
    "decode_failed",
    "size_changed",
]
"""What kind of problem a `Problem` is; ``stoker scan`` and ``dataset.report`` count by it."""


class StokerError(Exception):
    """Base class of errors raised by stoker."""


class ConfigError(StokerError, ValueError):
    """A configuration value or file that has no safe meaning."""


class DatasetError(StokerError):
    """A dataset that cannot be loaded as configured."""


class CacheError(StokerError):
    """A cache that cannot be read or written."""


class WorkerFailed(StokerError, RuntimeError):
    """A DataLoader worker process died (killed by a signal or exited) while loading batches."""


class SharedMemoryFull(StokerError, RuntimeError):
    """Batches could not be passed from workers because shared memory (/dev/shm) is full."""


class StokerWarning(UserWarning):
    """A setting was changed or a problem was worked around; the message says what and why."""


class LoaderTimeout(StokerError, RuntimeError):
    """A batch took longer than the loader's ``timeout``; names the batch and the files it held."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """A file that could not be used as it is.

    Attributes:
        path: the file.
        reason: plain words (``"zero-byte file"``, ``"caption is not UTF-8"``).
        kind: what kind of problem (`ProblemKind`), for counting.
        subset: index of the subset the file belongs to (in ``dataset.catalog.subsets``), or
            ``None`` when it is not known (a decode failure reported by a plain worker).
        stage: ``"scan"`` (found while scanning), ``"bucket"`` (too small for any bucket) or
            ``"decode"`` (found while a batch was made).
        action: what stoker did: ``"skipped"``, ``"replaced"``, ``"used class tokens"`` or
            ``"used empty caption"``.
    """

    path: str
    reason: str
    kind: ProblemKind = "bad_image"
    subset: int | None = None
    stage: str = "scan"
    action: str = "skipped"


class InputBoundWarning(StokerWarning):
    """The training loop waited for data more than the monitor's threshold (``stoker.monitor``)."""
