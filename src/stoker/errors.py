"""The one tree of stoker errors and warnings.

- ``StokerError``: base of everything stoker raises on purpose.
  - ``ConfigError``: a dataset config, folder name or setting that cannot be used (also a ``ValueError``).
  - ``DatasetError``: the data itself cannot be loaded (missing folder, empty dataset, bad files under
    ``on_error="raise"``).
  - ``CacheError``: a scan or tuning cache cannot be read or written.
  - ``WorkerFailed`` (also a ``RuntimeError``): a loader worker died; names it and what it loaded.
  - ``SharedMemoryFull`` (also a ``RuntimeError``): ``/dev/shm`` is too small for the batches.
- ``StokerWarning``: every warning stoker issues, so users can filter them in one line.
  - ``InputBoundWarning``: the training loop waits for data (``stoker.monitor``); it depends on
    how busy the machine is, so it has its own class to filter (the test suite ignores it).

Every message says what went wrong, where (file, table, key, image path) and how to fix it.
"""

from __future__ import annotations


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


class InputBoundWarning(StokerWarning):
    """The training loop waited for data more than the monitor's threshold (``stoker.monitor``)."""
