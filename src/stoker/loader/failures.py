"""Why a loader failed, in words: a dead worker (which one, what it held) or full shared memory."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from stoker import torch_internals
from stoker.data.protocol import BatchingDataset
from stoker.errors import LoaderTimeout, SharedMemoryFull, WorkerFailed

if TYPE_CHECKING:
    from stoker.loader.build import StokerLoader

__all__ = ["explain_failure", "stop_workers"]

logger = logging.getLogger("stoker")

_DEAD_WORKER = re.compile(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\)(.*)")
_SHM_SIGNS = (
    "No space left on device",
    "/dev/shm",
    "unable to write to file </torch_",
    "shared memory",
)


def explain_failure(
    err: Exception, inner: Any, loader: StokerLoader, index: int = 0, *, send_offset: int = 0
) -> Exception:
    """Turn PyTorch's worker-failure errors into ones that say which worker, what, and the fix.

    A dead worker shows up as PyTorch's RuntimeError ("killed by signal", "exited unexpectedly")
    or, when the batch it was handing over is cut off, as a ConnectionResetError or EOFError;
    the workers' exit codes tell which one died either way. PyTorch's "DataLoader timed out"
    becomes ``LoaderTimeout`` naming batch ``index`` of the epoch and the files outstanding.
    ``send_offset``: ``inner``'s send index ``i`` is the sampler iteration's batch
    ``i + send_offset`` (not 0 for the old iterator of a live-tuning hand-over, whose batches
    come before those of the iteration the sampler now runs).
    """
    text = str(err)
    if "DataLoader timed out" in text:
        every = set(range(len(torch_internals.worker_processes(inner))))
        loading = _what_workers_loaded(inner, loader, every, send_offset)
        stop_workers(inner)
        return LoaderTimeout(
            f"batch {index} of this epoch did not arrive within timeout={loader.timeout} s; the "
            f"workers were loading: {loading}. Raise timeout (0 waits forever), or check these "
            "files: a slow network disk, or an image far larger than the rest."
        )
    if any(sign in text for sign in _SHM_SIGNS):
        stop_workers(inner)
        cause = [line for line in text.splitlines() if line.strip()][-1].strip()
        return SharedMemoryFull(
            f"workers could not hand batches to the main process: shared memory is full ({cause}). "
            "Give the container more (docker run --shm-size=8g), or use fewer workers, a smaller "
            "prefetch_factor, or output='uint8' (4x fewer bytes per batch)."
        )
    match = _DEAD_WORKER.search(text)
    named = {int(p) for p in re.findall(r"\d+", match.group(1))} if match else set()
    workers = torch_internals.worker_processes(inner)
    # A cut-off pipe can arrive before the kernel has the killed worker's exit status (a busy
    # machine takes a moment to reap it): wait for it briefly rather than give up.
    deadline = time.monotonic() + (2.0 if isinstance(err, (ConnectionError, EOFError)) else 0.0)
    while True:
        dead = {
            i: w
            for i, w in enumerate(workers)
            if getattr(w, "pid", None) in named or getattr(w, "exitcode", None) not in (None, 0)
        }
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not dead:
        return err
    loading = _what_workers_loaded(inner, loader, set(dead), send_offset)
    codes = {w.exitcode for w in dead.values()}
    stop_workers(inner)
    pids = ", ".join(str(w.pid) for w in dead.values())
    who = ", ".join(f"worker {i}" for i in dead)
    killed = [-c for c in codes if isinstance(c, int) and c < 0]
    if killed or "signal" in text:
        how = f"killed by signal {', '.join(_signal_name(n) for n in killed) or text}"
        why = (
            "The usual cause is the out-of-memory killer (see dmesg): use fewer workers than "
            f"{loader.num_workers}, a smaller prefetch_factor, or output='uint8'."
        )
    else:
        how = f"exited with code {', '.join(str(c) for c in codes)}"
        why = (
            "Its traceback is printed above. With the spawn or forkserver start method, the "
            "script that builds the loader must run under `if __name__ == '__main__':`."
        )
    return WorkerFailed(
        f"DataLoader {who} (pid {pids}) died, {how}. It was loading: {loading}. {why} "
        "The run can resume from loader.state_dict() saved before the failure."
    )


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _what_workers_loaded(
    inner: Any, loader: StokerLoader, worker_ids: set[int], send_offset: int = 0
) -> str:
    """The samples outstanding at the given workers, as image paths when the dataset has them."""
    tasks = torch_internals.outstanding_tasks(inner)
    dataset = loader.dataset
    sampler = loader.resumable_sampler
    found: list[str] = []
    for send_index, info in sorted(tasks.items()):
        if len(info) != 1 or info[0] not in worker_ids:
            continue  # already returned, or another worker's
        at = send_index + send_offset
        batch = sampler.batch_of_iteration(at) if sampler is not None else None
        if batch is None:
            found.append(f"batch {send_index} of this epoch")
        elif isinstance(dataset, BatchingDataset):
            found += dataset.sample_paths(batch)
        else:
            found.append(repr(list(batch)))
    found = list(dict.fromkeys(found))  # repeats put one image in several slots
    return ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") or (
        "nothing identifiable"
    )


def stop_workers(inner: Any) -> None:
    """Stop the remaining workers now, so none is left behind as a zombie."""
    torch_internals.unwatch_worker_exits(inner)
    try:
        torch_internals.shutdown_workers(inner)
    except Exception:  # shutting down after a failure must not hide the failure
        logger.debug("worker shutdown after a failure raised", exc_info=True)
