"""The fence around PyTorch's private DataLoader internals: every private touch stoker makes is here.

stoker reads or changes five private members of torch's multi-process DataLoader iterator, each
for a reason a public API does not cover:

- ``_workers`` (the worker processes): name the worker that died, and its pid, in ``WorkerFailed``;
- ``_task_info`` (batches sent, by worker): say which images a dead worker was loading;
- ``_sampler_iter``: ask for nothing more when a loop leaves early (spawned workers stopped while
  busy abort, see ``StokerLoader``);
- ``_worker_pids_set`` with ``torch.utils.data._utils.signal_handling._remove_worker_pids``: take the
  workers off torch's SIGCHLD watch, so a dead worker is reported at the next batch with its name
  instead of from whatever line the training loop runs;
- ``_shutdown_workers``: stop workers now after a failure, so none is left as a zombie;
- ``DataLoader._iterator``: the iterator that holds persistent workers.
- ``DataLoader._index_sampler`` (the sampler the iterators draw from and ``len()`` counts):
  ``StokerLoader`` overrides it to iterate this rank's batches while ``batch_sampler`` shows every
  rank's, so accelerate's ``prepare`` re-shards to the same split (``loader.build``).

Written against torch ``TESTED_TORCH``. When a member is missing (a torch release changed it),
stoker warns once and falls back to plain DataLoader behaviour for that feature; nothing else
changes. ``tests/test_torch_internals.py`` is the canary: it fails loudly when an upgrade removes
or retypes one of them.
"""

from __future__ import annotations

from typing import Any

import torch

from stoker.warn import warn

__all__ = [
    "TESTED_TORCH",
    "missing_internals",
    "outstanding_tasks",
    "persistent_iterator",
    "shutdown_workers",
    "stop_asking",
    "unwatch_worker_exits",
    "worker_processes",
]

TESTED_TORCH = ("2.13",)

# Members of a live multi-process iterator that stoker uses.
ITERATOR_MEMBERS = (
    "_workers",
    "_task_info",
    "_sampler_iter",
    "_worker_pids_set",
    "_shutdown_workers",
)


def _multiprocess(inner: Any) -> bool:
    """Whether ``inner`` is torch's multi-process iterator (the single-process one has no workers)."""
    from torch.utils.data import dataloader

    return isinstance(inner, dataloader._MultiProcessingDataLoaderIter)


def missing_internals(inner: Any) -> list[str]:
    """The members of a live multi-process iterator that stoker needs and torch no longer has."""
    missing = [name for name in ITERATOR_MEMBERS if not hasattr(inner, name)]
    from torch.utils.data._utils import signal_handling

    if not callable(getattr(signal_handling, "_remove_worker_pids", None)):
        missing.append("signal_handling._remove_worker_pids")
    return missing


def _degraded(member: str, feature: str) -> None:
    warn(
        f"stoker was written against torch {', '.join(TESTED_TORCH)}; torch {torch.__version__} "
        f"has no DataLoader internal '{member}', so {feature} is off (plain DataLoader behaviour). "
        "Everything else works; please report it to stoker.",
        key=("torch-internal", member),
    )


def worker_processes(inner: Any) -> list[Any]:
    """The worker processes of a live iterator (empty for one without workers)."""
    if not _multiprocess(inner):
        return []
    workers = getattr(inner, "_workers", None)
    if workers is None:
        _degraded("_workers", "naming a dead worker")
        return []
    return list(workers)


def outstanding_tasks(inner: Any) -> dict[int, tuple[Any, ...]]:
    """``{send index: (worker id,)}`` for batches sent to a worker and not yet returned (torch
    keeps returned ones as ``(worker id, batch)``)."""
    if not _multiprocess(inner):
        return {}
    tasks = getattr(inner, "_task_info", None)
    if not isinstance(tasks, dict):
        _degraded("_task_info", "naming the images a dead worker held")
        return {}
    return tasks


def stop_asking(inner: Any) -> bool:
    """Ask the workers for no more batches; ``False`` when this torch does not allow it."""
    if not _multiprocess(inner):
        return False
    if not hasattr(inner, "_sampler_iter"):
        _degraded("_sampler_iter", "a quiet early stop of spawned workers")
        return False
    inner._sampler_iter = iter(())
    return True


def unwatch_worker_exits(inner: Any) -> None:
    """Take the workers off torch's SIGCHLD watch list (see the module docstring)."""
    if not _multiprocess(inner) or not getattr(inner, "_worker_pids_set", False):
        return
    from torch.utils.data._utils import signal_handling

    remove = getattr(signal_handling, "_remove_worker_pids", None)
    if not callable(remove):
        _degraded("signal_handling._remove_worker_pids", "reporting dead workers at the next batch")
        return
    remove(id(inner))
    inner._worker_pids_set = False


def shutdown_workers(inner: Any) -> None:
    """Stop the iterator's workers now (a no-op for anything that is not torch's iterator)."""
    if not _multiprocess(inner):
        return
    stop = getattr(inner, "_shutdown_workers", None)
    if not callable(stop):
        _degraded("_shutdown_workers", "stopping workers right after a failure")
        return
    stop()


def persistent_iterator(loader: Any) -> Any:
    """The iterator a DataLoader with persistent workers keeps between epochs, or ``None``."""
    return getattr(loader, "_iterator", None)
