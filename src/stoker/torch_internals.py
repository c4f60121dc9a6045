"""The fence around PyTorch's private DataLoader internals: every private touch stoker makes is here.

stoker reads or changes these private members of torch's multi-process DataLoader iterator, each
for a reason a public API does not cover:

- ``_workers`` (the worker processes): name the worker that died, and its pid, in ``WorkerFailed``;
- ``_task_info`` (batches sent, by worker): say which images a dead worker was loading;
- ``_sampler_iter``: ask for nothing more when a loop leaves early (spawned workers stopped while
  busy abort, see ``StokerLoader``);
- ``_worker_pids_set`` with ``torch.utils.data._utils.signal_handling._remove_worker_pids``: take the
  workers off torch's SIGCHLD watch, so a dead worker is reported at the next batch with its name
  instead of from whatever line the training loop runs;
- ``_try_put_index``, ``_get_data`` and ``_reset`` (with ``_data_queue``, ``_next_index``,
  ``_workers_status``, ``_index_queues``, ``_workers_num_tasks``, ``_tasks_outstanding``,
  ``_prefetch_factor``, ``_num_workers``, ``_in_order``): hand each batch to the least busy
  worker, let a batch that arrived before its turn ask for the next, keep more batches in flight
  than torch while made ones wait unread, and give back the shared-memory blocks of batches
  torch drops unseen at a persistent iterator's next epoch (``dispatch_by_work``; issues #11, #13);
- ``_send_idx`` and ``_rcvd_idx`` (batches asked for, batches handed out): how many batches a
  live-tuning switch still gets from the old workers, so the new ones can start at once after them
  (``outstanding_batches``), and which batches the old workers hold, to name them if one dies
  during the hand-over (``sent_batches``);
- ``_shutdown_workers``: stop workers now after a failure, so none is left as a zombie;
- ``DataLoader._iterator``: the iterator that holds persistent workers;
- ``UntypedStorage._new_shared``: build a worker's batch in shared memory from the start, as
  torch's own ``default_collate`` does, so sending it to the main process copies nothing
  (`new_shared_tensor`; issue #11);
- ``DataLoader.persistent_workers`` (refused by ``DataLoader.__setattr__`` after construction),
  ``num_workers``, ``prefetch_factor``, ``timeout`` and ``multiprocessing_context``: live tuning
  gives a loader another worker count between two batches (``set_worker_settings``,
  ``stoker.autotune``).
- ``DataLoader._index_sampler`` (the sampler the iterators draw from and ``len()`` counts):
  ``StokerLoader`` overrides it to iterate this rank's batches while ``batch_sampler`` shows every
  rank's, so accelerate's ``prepare`` re-shards to the same split (``loader.build``).

Written against torch ``TESTED_TORCH``. When a member is missing (a torch release changed it),
stoker warns once and falls back to plain DataLoader behaviour for that feature; nothing else
changes. ``tests/test_torch_internals.py`` is the canary: it fails loudly when an upgrade removes
or retypes one of them.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from stoker.warn import warn

logger = logging.getLogger("stoker")

__all__ = [
    "AHEAD_ROUNDS",
    "IN_FLIGHT",
    "TESTED_TORCH",
    "missing_internals",
    "new_shared_tensor",
    "outstanding_batches",
    "outstanding_tasks",
    "persistent_iterator",
    "shutdown_workers",
    "sent_batches",
    "set_worker_settings",
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
    "_send_idx",
    "_rcvd_idx",
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


def outstanding_batches(inner: Any) -> int | None:
    """Batches the iterator has asked its workers for and not handed out yet (0 for the
    single-process iterator, which asks for one batch at a time); ``None`` when this torch does
    not say, or for anything but torch's iterators."""
    if type(inner).__name__ == "_SingleProcessDataLoaderIter":
        return 0
    if not _multiprocess(inner):
        return None
    sent, handed = getattr(inner, "_send_idx", None), getattr(inner, "_rcvd_idx", None)
    if not (isinstance(sent, int) and isinstance(handed, int)):
        _degraded("_send_idx", "starting new workers while the old ones hand over")
        return None
    return sent - handed


def sent_batches(inner: Any) -> int:
    """Batches the multi-process iterator has asked its workers for in this epoch (its send
    indices run from 0); 0 for anything else."""
    sent = getattr(inner, "_send_idx", 0) if _multiprocess(inner) else 0
    return sent if isinstance(sent, int) else 0


def stop_asking(inner: Any) -> bool:
    """Ask the iterator for no more batches (the ones already asked for still arrive, then it
    stops as at an epoch's end); ``False`` for anything but torch's iterators, or when this torch
    does not allow it."""
    if not (_multiprocess(inner) or type(inner).__name__ == "_SingleProcessDataLoaderIter"):
        return False
    if not hasattr(inner, "_sampler_iter"):
        _degraded("_sampler_iter", "a quiet early stop of spawned workers")
        return False
    inner._sampler_iter = iter(())
    return True


# Batches that may arrive ahead of their turn and wait in the main process, as rounds of torch's
# own `workers x prefetch_factor` (see `dispatch_by_work`): 2 rounds reached x0.93 of twice one
# process at 2 workers, against x0.83 with none and x0.89 with 1 (issue #11, docs/performance.md).
AHEAD_ROUNDS = 2
# Batches kept asked for ahead of the training loop whatever the worker count, where torch keeps
# `prefetch_factor` per worker (see `dispatch_by_work`'s ``depth``). With a training step that
# takes batches at a steady pace, the loop waits when a run of costly images drains what is
# ready; torch's 4 at 2 workers let it wait 29% of its time, 8 22% (8% more batches per second),
# 12 no less (issue #13, docs/tuning.md). It also stops the worker count from deciding the
# depth: 3 workers beat 2 with such a loop only by their 6 batches against 4.
IN_FLIGHT = 8

# Members the least-work hand-out replaces or uses (`dispatch_by_work`).
DISPATCH_MEMBERS = (
    "_reset",
    "_try_put_index",
    "_next_index",
    "_workers_status",
    "_index_queues",
    "_task_info",
    "_workers_num_tasks",
    "_tasks_outstanding",
    "_send_idx",
    "_prefetch_factor",
    "_num_workers",
    "_in_order",
    "_get_data",
    "_rcvd_idx",
)


def dispatch_by_work(
    inner: Any,
    cost: Callable[[Any], float],
    *,
    depth: int | None = None,
    ahead: int | None = None,
    dropped: Callable[[Any], object] | None = None,
) -> bool:
    """Hand each next batch to the worker with the least work outstanding (the sum of ``cost``
    of the indices it was sent and has not returned) instead of torch's strict turn, and keep
    workers busy while an earlier batch is late; the batches, and the order they are returned
    in, stay the same. ``False`` (nothing changed) for anything but torch's in-order
    multi-process iterator, or when this torch lacks a member it needs.

    Why: torch gives batch k to worker k mod n and returns batches in order, so when batches
    cost unevenly the worker with the cheap ones finishes its few and waits (issue #11). Torch
    asks for a new batch only when it hands one out, so a batch that arrives before an earlier,
    costlier one leaves its worker idle until the costly one is done. Here such a batch asks
    for the next at once, while the batches asked for and not handed out are at most ``ahead``
    more than ``depth`` (default `AHEAD_ROUNDS` x torch's ``workers x prefetch_factor``; 0:
    torch's refill only).

    ``depth``: the batches kept asked for and not yet received while made batches wait unread
    in the queue (the workers are ahead of the loop), at least torch's
    ``workers x prefetch_factor`` (the default). Torch asks for one batch per batch it hands
    out; here such a hand-out tops the workers up to ``depth``, so the batches ready ahead of a
    steadily paced loop do not depend on the worker count (`IN_FLIGHT`).

    ``dropped`` is called with each batch torch throws away unseen: when a persistent
    iterator starts its next epoch after the loop left one early, the batches that had arrived
    before their turn and those still on their way (torch's ``_reset`` reads and drops them).
    stoker's datasets give such a batch's shared-memory blocks back to its worker there, which
    would otherwise wait for them for the rest of the run and send every later batch in fresh
    segments.
    """
    if not _multiprocess(inner) or getattr(inner, "_in_order", None) is not True:
        return False
    if getattr(inner, "_stoker_dispatch", False):
        return True
    for member in DISPATCH_MEMBERS:
        if not hasattr(inner, member):
            _degraded(member, "handing batches to the least busy worker")
            return False
    costs: dict[int, float] = {}
    # A weak reference: the iterator holds this function, which must not keep the iterator (and
    # so its workers) alive after the loop dropped it.
    iterator = weakref.ref(inner)

    def try_put_index(returned: int | None = None) -> None:  # torch's, by work; see below
        inner = iterator()
        if inner is None:
            return
        # torch asks for one batch per batch handed out (a batch that arrived ahead of its turn
        # may have asked for this one already). While batches wait in the queue unread, the
        # workers are ahead of the loop and would idle once done: top them up to `deep`. Not
        # while the loop takes each batch as it comes: then they are busy, and asking further
        # ahead only commits batches to workers earlier (batch 4 on 2 CPUs: x0.90 the rate).
        target = deep if deep > torch_depth and _waiting(inner) else torch_depth
        while (
            inner._tasks_outstanding < target and inner._send_idx - inner._rcvd_idx < deep + limit
        ):
            if not put_index(inner, returned):
                return

    def put_index(inner: Any, returned: int | None) -> bool:  # one batch; False: none to send
        try:
            index = inner._next_index()
        except StopIteration:
            return False
        work = {w: 0.0 for w, up in enumerate(inner._workers_status) if up}
        if not work:
            return False
        for sent in [k for k in costs if k not in inner._task_info]:
            del costs[sent]
        for sent, info in inner._task_info.items():
            if len(info) == 1 and info[0] in work and sent != returned:  # not returned yet
                work[info[0]] += costs.get(sent, 0.0)
        worker = min(work, key=lambda w: (work[w], w))
        sent, this = inner._send_idx, float(cost(index))  # the cost first: it may raise
        inner._index_queues[worker].put((sent, index))
        inner._task_info[sent] = (worker,)
        costs[sent] = this
        inner._workers_num_tasks[worker] += 1
        inner._tasks_outstanding += 1
        inner._send_idx += 1
        return True

    get_data = type(inner)._get_data  # unbound: a bound method would keep the iterator alive

    def get_data_and_refill() -> Any:  # torch's _get_data; a batch ahead of its turn refills
        inner = iterator()
        if inner is None:
            raise RuntimeError("stoker: the DataLoader iterator is gone")
        got = get_data(inner)
        # Only a batch of this iteration that came before its turn; not the replies of
        # persistent workers to the next epoch's start (torch's _reset reads those through here
        # and drops anything else, so a batch asked for then would be lost).
        idx = got[0] if isinstance(got, tuple) and got else None
        if not (isinstance(idx, int) and inner._rcvd_idx < idx < inner._send_idx):
            if resetting and isinstance(idx, int):
                # inside torch's _reset: a batch of the iteration the loop left, dropped unseen
                _drop(got[1])
            return got
        # This batch waits for an earlier, costlier one: ask for the next now, so the worker that
        # made it keeps working instead of idling until the earlier batch arrives.
        if inner._send_idx - inner._rcvd_idx < deep + limit:
            inner._tasks_outstanding -= 1  # torch counts this batch as returned right after
            try:
                try_put_index(got[0])
            finally:
                inner._tasks_outstanding += 1
        return got

    reset = type(inner)._reset
    resetting = False

    def _drop(batch: Any) -> None:
        if dropped is None:
            return
        try:
            dropped(batch)
        except Exception:  # a failure here must not leave torch's _reset half done
            logger.debug("stoker: giving back a dropped batch failed", exc_info=True)

    def drop_and_reset(loader: Any, first_iter: bool = False) -> None:  # torch's _reset
        nonlocal resetting
        inner = iterator()
        if inner is None:
            raise RuntimeError("stoker: the DataLoader iterator is gone")
        # batches that arrived before their turn and were never handed out: reset forgets them
        for info in list(inner._task_info.values()):
            if len(info) == 2:
                _drop(info[1])
        resetting = True
        try:
            reset(inner, loader, first_iter)
        finally:
            resetting = False

    torch_depth = inner._prefetch_factor * inner._num_workers
    deep = torch_depth if depth is None else max(depth, torch_depth)
    if deep > torch_depth and not hasattr(inner, "_data_queue"):
        _degraded("_data_queue", "keeping more batches in flight than torch")
        deep = torch_depth
    limit = AHEAD_ROUNDS * torch_depth if ahead is None else ahead
    inner._try_put_index = try_put_index
    inner._get_data = get_data_and_refill
    inner._reset = drop_and_reset
    inner._stoker_dispatch = True
    return True


def _waiting(inner: Any) -> bool:
    """Whether batches wait in the iterator's queue, made and not yet read by the loop."""
    try:
        return not inner._data_queue.empty()
    except (OSError, ValueError):  # a queue closed under us: the iterator is shutting down
        return False


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


def new_shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, or an ordinary one when torch lacks the way.

    Called inside DataLoader workers, so it never warns (stoker warns from the main process only);
    the canary test names the member if an upgrade removes it, and batches are then copied into
    shared memory by torch as before.
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if not callable(new_shared):
        return torch.empty(shape, dtype=dtype)
    nbytes = dtype.itemsize
    for side in shape:
        nbytes *= side
    storage: torch.UntypedStorage = new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def persistent_iterator(loader: Any) -> Any:
    """The iterator a DataLoader with persistent workers keeps between epochs, or ``None``."""
    return getattr(loader, "_iterator", None)


def set_worker_settings(
    loader: Any,
    *,
    num_workers: int,
    prefetch_factor: int | None,
    persistent_workers: bool,
    timeout: float,
    multiprocessing_context: str | None,
    keep_running: bool = False,
) -> Any:
    """Give ``loader`` another worker count for its next iterator; stop its persistent workers.

    With ``keep_running`` the persistent iterator is not stopped but detached and returned (the
    caller takes what it still hands out, then stops it with ``shutdown_workers``); else the
    result is ``None``. ``multiprocessing_context`` is set after ``num_workers``, since its
    setter checks that there are workers; ``persistent_workers`` bypasses
    ``DataLoader.__setattr__``, which refuses it.
    """
    old = persistent_iterator(loader)
    if old is not None:
        if not keep_running:
            shutdown_workers(old)
            old = None
        loader._iterator = None
    loader.num_workers = num_workers
    loader.prefetch_factor = prefetch_factor
    loader.timeout = timeout
    loader.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
    object.__setattr__(loader, "persistent_workers", persistent_workers)
    return old
