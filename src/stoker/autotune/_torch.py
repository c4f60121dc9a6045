"""Fenced: every private PyTorch DataLoader touch of live tuning, in one place (torch 2.13).

A worker count is fixed when a DataLoader iterator starts; changing it between two batches takes
three things torch has no public call for. When torch changes these fields, only this file moves.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["set_worker_settings", "stop_asking"]

logger = logging.getLogger("stoker")


def stop_asking(inner: Any) -> None:
    """Ask the running iterator for no more batches: the ones already asked for still arrive, in
    order, and then it stops (``StopIteration``) as at the end of an epoch."""
    inner._sampler_iter = iter(())  # DataLoader iterators draw their next indices from here


def set_worker_settings(
    loader: Any,
    *,
    num_workers: int,
    prefetch_factor: int | None,
    persistent_workers: bool,
    timeout: float,
    multiprocessing_context: str | None,
) -> None:
    """Give ``loader`` another worker count for its next iterator; stop its persistent workers.

    DataLoader refuses ``persistent_workers`` after construction (its ``__setattr__``), and keeps
    persistent workers in ``_iterator``; both are reset here. ``multiprocessing_context`` is set
    after ``num_workers``, since its setter checks that there are workers.
    """
    old = getattr(loader, "_iterator", None)
    if old is not None:
        shutdown = getattr(old, "_shutdown_workers", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # workers that already exited must not stop the switch
                logger.debug("stopping the previous workers raised", exc_info=True)
        loader._iterator = None
    loader.num_workers = num_workers
    loader.prefetch_factor = prefetch_factor
    loader.timeout = timeout
    loader.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
    object.__setattr__(loader, "persistent_workers", persistent_workers)
