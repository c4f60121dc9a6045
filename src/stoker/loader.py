"""Build a real ``torch.utils.data.DataLoader`` from a plan; the only module that constructs one.

``plan_loader`` reads what the platform offers (CUDA, start methods, the CPU budget), plans, and
tells each change once per process as a ``StokerWarning`` and on the ``stoker`` logger.
``make_loader`` builds the DataLoader from that plan, with deterministic worker seeds; with
``workers="auto"`` it first measures the dataset (``stoker.tune``), and the loader it returns
times how long training waits for each batch (``stoker.monitor``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import sys
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader

from stoker.autotune.driver import LiveTuning
from stoker.autotune.edges import start_live, tunes_live
from stoker.budget import Budget, cpu_budget
from stoker.errors import SharedMemoryFull, StokerWarning, WorkerFailed
from stoker.monitor import (
    InputMonitor,
    LoaderStats,
    batch_samples,
    input_bound_advice,
    input_bound_message,
    warn_input_bound,
)
from stoker.plan import (
    Adjustment,
    LoaderPlan,
    LoaderRequest,
    MeasuredChoice,
    make_plan,
    max_useful_workers,
)

__all__ = ["StokerLoader", "make_loader", "plan_loader"]

logger = logging.getLogger("stoker")

# Adjustments already told in this process: warn once, not once per epoch or per loader.
_told: set[tuple[str, str, str, str]] = set()

# DataLoader's own names for the settings stoker plans, accepted by make_loader as aliases so
# code written for DataLoader ports over unchanged.
_ALIASES = {
    "num_workers": "workers",
    "persistent_workers": "persistent",
    "multiprocessing_context": "start_method",
}


def tell(adjustments: Iterable[Adjustment]) -> None:
    """Warn about each adjustment once per process (``StokerWarning``) and log it."""
    for adj in adjustments:
        key = (adj.setting, repr(adj.requested), repr(adj.chosen), adj.reason)
        if key in _told:
            continue
        _told.add(key)
        message = (
            f"stoker changed {adj.setting} from {adj.requested!r} to {adj.chosen!r}: {adj.reason}"
        )
        logger.warning(message)
        warnings.warn(message, StokerWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside stoker, so warnings point at the user's line."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("stoker"):
        frame = frame.f_back
        level += 1
    return level


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not stop data loading
        return False


def plan_loader(
    *,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | Literal["auto"] | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    budget: Budget | int | None = None,
    warn: bool = True,
    measured: MeasuredChoice | None = None,
) -> LoaderPlan:
    """Plan DataLoader settings that are always valid on this machine (rules: ``stoker.plan``).

    Args are ``LoaderRequest``'s fields; ``budget`` is a ``Budget``, a CPU count, or ``None`` to
    measure it with ``cpu_budget()``. With ``warn`` each change is told once per process.
    ``measured`` is a probe's choice (``stoker.tune_loader(...).choice``) for the fields asked as
    ``"auto"``; without one, ``"auto"`` means the default and ``plan.defaults`` says so.

    Raises:
        ValueError: a setting has no safe meaning (``workers="eight"``, ``prefetch_factor=-1``).
    """
    request = LoaderRequest(
        workers=workers,
        persistent=persistent,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=start_method,
    )
    return plan_request(request, budget=budget, warn=warn, measured=measured)


def resolve_budget(budget: Budget | int | None) -> Budget:
    """A ``Budget`` from a ``Budget``, a CPU count, or ``None`` (measured by ``cpu_budget()``)."""
    if budget is None:
        return cpu_budget()
    if not isinstance(budget, Budget):
        return Budget.fixed(budget)
    return budget


def plan_request(
    request: LoaderRequest,
    *,
    budget: Budget | int | None = None,
    warn: bool = True,
    measured: MeasuredChoice | None = None,
) -> LoaderPlan:
    """``plan_loader`` for a ready ``LoaderRequest``."""
    budget = resolve_budget(budget)
    methods = torch.multiprocessing.get_all_start_methods()
    plan = make_plan(
        request,
        budget,
        cuda_available=_cuda_available(),
        start_methods=methods,
        default_start_method=methods[0] if methods else None,
        measured=measured,
    )
    if warn:
        tell(plan.adjustments)
    for note in plan.defaults:
        logger.debug("stoker chose %s", note)
    return plan


def _tell_batch_size_ignored(batch_size: int | None, dataset: Any) -> None:
    """stoker datasets batch with their config's sizes; say so when the caller asked otherwise."""
    sizes = sorted({int(b) for b in getattr(dataset, "batch_sizes", [])})
    if batch_size in (None, 1) or sizes == [batch_size]:
        return
    tell(
        [
            Adjustment(
                setting="batch_size",
                requested=batch_size,
                chosen=sizes[0] if len(sizes) == 1 else sizes,
                reason="a stoker dataset batches by bucket with each dataset's batch_size from its "
                "config; set batch_size there (load_dataset(..., batch_size=N) applies where the "
                "config leaves it unset)",
            )
        ]
    )


def distributed_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun/accelerate's ``RANK`` and ``WORLD_SIZE``; else (0, 1)."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        return 0, 1
    return rank, world_size


class WorkerInit:
    """Seeds ``random``, NumPy and torch in each worker from (seed, worker id); picklable for spawn.

    Each worker also gets one intra-op thread: workers are already one process per CPU, and more
    threads per worker would oversubscribe the budget.
    """

    def __init__(self, seed: int, user_fn: Callable[[int], None] | None = None) -> None:
        self.seed = seed
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        state = np.random.SeedSequence([self.seed, worker_id]).generate_state(2, dtype=np.uint32)
        worker_seed = (int(state[0]) << 32) | int(state[1])
        random.seed(worker_seed)
        np.random.seed(int(state[0]))
        torch.manual_seed(worker_seed)
        torch.set_num_threads(1)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class StokerLoader(DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` that knows its plan and seed, resumes, and fails clearly.

    - ``loader.plan`` and ``loader.seed``: what it was built from.
    - ``state_dict()`` / ``load_state_dict()``: the position in the epoch, counted in batches the
      training loop received (not the ones prefetched ahead), so a resumed run yields exactly the
      remaining batches. Needs a sampler with ``state_dict`` (stoker datasets have one).
    - A worker that dies (OOM killer, SIGKILL) raises ``WorkerFailed`` naming the worker and the
      images it was loading; a full ``/dev/shm`` raises ``SharedMemoryFull`` with the fix.
    - Batches of stoker datasets carry ``replaced``: files that failed to decode in a worker and
      were replaced by another image of their bucket; the loader records them in
      ``dataset.decode_problems`` and warns once per file.
    - ``stats()``: how long the training loop waited for data (``stoker.monitor``); when it waits
      too much the loader warns once with what to try.
    """

    plan: LoaderPlan
    seed: int
    monitor: InputMonitor | None = None
    _live: Any = None
    _tuning: LiveTuning | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over torch's
        sampler = self.batch_sampler
        consumed = getattr(sampler, "mark_consumed", None)
        monitor = self.monitor
        tuning = self._tuning  # live tuning (stoker.autotune): it switches workers between batches
        if tuning is not None:
            tuning.start_epoch()
            if tuning.pending is not None:  # decided on the last epoch's last batch
                tuning.switch(self, **_position(sampler, epoch_start=True), reposition=False)
        timed = monitor is not None or tuning is not None
        clock = monitor.clock if monitor is not None else time.perf_counter
        inner = self._start_workers()
        if monitor is not None:
            monitor.start_epoch()
        index = 0
        asked = 0.0
        switched = False
        try:
            while True:
                if timed and not switched:  # after a switch, the wait began before it
                    asked = clock()
                switched = False
                try:
                    batch = next(inner)
                except StopIteration:
                    if tuning is None or not tuning.draining or _epoch_done(sampler):
                        return
                    # Every batch asked for is handed out: continue with the new count.
                    tuning.switch(self, **_position(sampler), reposition=True)
                    inner = self._start_workers()
                    switched = True
                    continue
                except (RuntimeError, ConnectionError, EOFError) as err:
                    raise _explain_failure(err, inner, self) from err
                got = clock() if timed else 0.0
                if monitor is not None and monitor.record(asked, got, batch_samples(batch)):
                    self._warn_input_bound()
                if isinstance(batch, dict) and batch.get("replaced"):
                    self._record_replaced(batch["replaced"], index)
                if consumed is not None:
                    consumed()
                if tuning is not None:
                    tuning.observe(self, inner, asked, got, batch)
                index += 1
                yield batch
        except GeneratorExit:
            self._stop_early(inner)
            raise

    def _start_workers(self) -> Any:
        """Torch's iterator for this epoch (or the rest of it, after a switch)."""
        inner = super().__iter__()
        _unwatch_worker_exits(inner)
        # A weak reference: a loop that breaks early must not keep the workers alive.
        self._live = weakref.ref(inner)
        return inner

    def _stop_early(self, inner: Any) -> None:
        """The loop left mid-epoch: stop non-forked workers only once they are idle.

        With torch 2.13, spawned (and forkserver) workers that are stopped while still making a
        batch abort ("terminate called without an active exception", then "DataLoader worker is
        killed by signal: Aborted" from a later line of the user's program). Idle ones stop
        cleanly, so the few batches already asked for are collected first (at most workers x
        prefetch_factor) and nothing more is asked. Persistent workers stay for the next epoch.
        """
        if self.num_workers == 0 or self.persistent_workers or _start_method(self) == "fork":
            return
        if hasattr(inner, "_sampler_iter"):
            inner._sampler_iter = iter(())  # a private DataLoader field: ask for nothing more
        try:
            for _ in inner:
                pass
        except RuntimeError:
            logger.debug("a worker failed while the loader was stopping early", exc_info=True)
        _shutdown(inner)

    def stats(self) -> LoaderStats:
        """Wait time, wait fraction, throughput and decode errors so far (``LoaderStats``).

        Raises:
            ValueError: the loader was made with ``monitor=False``.
        """
        if self.monitor is None:
            raise ValueError(
                "this loader does not time its batches (made with monitor=False); "
                "use make_loader(..., monitor=True), the default"
            )
        problems = getattr(self.dataset, "decode_problems", None)
        tuning = self._tuning
        return self.monitor.stats(
            workers=self.num_workers,
            decode_problems=tuple(problems) if isinstance(problems, list) else (),
            switches=tuple(tuning.switches) if tuning is not None else (),
            tuning=tuning.reason if tuning is not None else None,
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the workers of the iteration in progress (empty when none are running)."""
        inner = self._live() if self._live is not None else None
        workers = getattr(inner, "_workers", None) or []
        return [int(w.pid) for w in workers if getattr(w, "pid", None) is not None]

    def _warn_input_bound(self) -> None:
        assert self.monitor is not None
        stats = self.stats()
        plan = getattr(self, "plan", None)
        budget = plan.budget if plan is not None else cpu_budget()
        advice = input_bound_advice(
            workers=self.num_workers,
            max_workers=max_useful_workers(budget),
            budget=f"{budget.cpus} CPUs, {budget.source}",
            measured=(plan is not None and plan.request.workers == "auto")
            or self._tuning is not None,
            output=getattr(self.dataset, "output", None),
            fast_decode=getattr(self.dataset, "fast_decode", None),
        )
        # +1: the warning is issued one frame further down, in stoker.monitor.
        warn_input_bound(input_bound_message(stats, self.monitor, advice), _user_stacklevel() + 1)

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is in its epochs (JSON-able); see the class docstring."""
        return dict(self._resumable().state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of that epoch."""
        self._resumable().load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` (epochs also advance on their own)."""
        self._resumable().set_epoch(epoch)

    def _resumable(self) -> Any:
        sampler = self.batch_sampler
        if not callable(getattr(sampler, "state_dict", None)):
            raise TypeError(
                "this loader's batch sampler cannot save its position; resume needs a stoker "
                "dataset (stoker.load_dataset) or a batch_sampler with state_dict()"
            )
        return sampler

    def _record_replaced(self, replaced: list[tuple[str, str]], index: int = 0) -> None:
        from stoker.data.catalog import Problem

        if self.monitor is not None:
            # PyTorch hands batch indices to workers round robin, so batch k came from k % n.
            self.monitor.record_errors(index % max(self.num_workers, 1), len(replaced))
        known = getattr(self.dataset, "decode_problems", None)
        for path, reason in replaced:
            problem = Problem(path=path, reason=reason, stage="decode", action="replaced")
            if isinstance(known, list) and problem not in known:
                known.append(problem)
                message = (
                    f"stoker could not decode {path} ({reason}); it was replaced by another "
                    "image of its bucket. Fix or remove the file; stoker scan lists bad files."
                )
                logger.warning(message)
                warnings.warn(message, StokerWarning, stacklevel=2)


def make_loader(
    dataset: Any,
    *,
    batch_size: int | None = 1,
    shuffle: bool = False,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | Literal["auto"] | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    seed: int | None = None,
    budget: Budget | int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    even_batches: Literal["pad", "drop"] = "pad",
    consumer_rate: float | None = None,
    monitor: bool | InputMonitor = True,
    **dataloader_kwargs: Any,
) -> StokerLoader:
    """Build a DataLoader for ``dataset`` from a plan that is valid on this machine.

    Settings are planned by ``plan_loader`` (changes are warned once). ``seed`` fixes the shuffle
    and every worker's ``random``/NumPy/torch seeds; ``None`` draws one, kept as ``loader.seed``.
    DataLoader's own names ``num_workers``, ``persistent_workers`` and ``multiprocessing_context``
    are accepted as aliases; other keyword arguments go to DataLoader unchanged.

    For stoker datasets (``load_dataset``) the dataset batches by bucket with the config's batch
    sizes, and ``rank``/``world_size`` (default: ``RANK``/``WORLD_SIZE`` set by torchrun or
    accelerate, else one process) shard whole batches across ranks: each rank gets the same
    number of batches per epoch; ``even_batches`` says whether the remainder is padded with
    batches from the start of the epoch (``"pad"``) or dropped (``"drop"``).

    ``workers="auto"`` (or ``prefetch_factor="auto"``) measures candidate settings on this
    dataset first and remembers the choice on disk (``stoker.tune_loader``; rules in
    ``stoker.tune``); ``consumer_rate`` is the training step's speed in batches/s, when known, so
    the fewest workers that keep up are chosen. A dataset that cannot be measured (one without
    ``len``) gets the default, as ``plan_loader`` does.

    ``monitor`` times how long the training loop waits for each batch (``loader.stats()``) and
    warns once when it waits too much (``stoker.monitor``); ``False`` turns it off, and an
    ``InputMonitor`` sets its window, threshold and clock.
    """
    settings: dict[str, Any] = {
        "workers": workers,
        "persistent": persistent,
        "start_method": start_method,
    }
    for alias, name in _ALIASES.items():
        if alias in dataloader_kwargs:
            value = dataloader_kwargs.pop(alias)
            if settings[name] is not None:
                raise ValueError(f"give either {name}= or {alias}=, not both")
            settings[name] = value
    request = LoaderRequest(
        workers=settings["workers"],
        persistent=settings["persistent"],
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=settings["start_method"],
    )
    if seed is None:
        seed = getattr(dataset, "seed", None)
        seed = secrets.randbits(63) if seed is None else seed
    measured = None
    live = None
    budget = resolve_budget(budget)
    if tunes_live(request, dataset, budget, dataloader_kwargs):
        # --- live tuning (stoker.autotune): start from a remembered or the budget's count ---
        live_budget = budget
        live = start_live(
            dataset,
            request,
            live_budget,
            batch_size=batch_size,
            plan_for=lambda fixed: plan_request(fixed, budget=live_budget, warn=False),
        )
        tell(live.plan.adjustments)
    elif "auto" in (request.workers, request.prefetch_factor) and hasattr(dataset, "__len__"):
        # Deferred import: tune builds its probe loaders with make_loader (tune -> loader).
        from stoker.tune import tune_loader

        result = tune_loader(
            dataset,
            request=request,
            batch_size=batch_size,
            budget=budget,
            consumer_rate=consumer_rate,
            seed=seed,
            loader_kwargs=dataloader_kwargs,
        )
        measured = result.choice
    plan = (
        live.plan if live is not None else plan_request(request, budget=budget, measured=measured)
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    worker_init = WorkerInit(seed, dataloader_kwargs.pop("worker_init_fn", None))
    if callable(getattr(dataset, "make_batch_sampler", None)):
        # stoker datasets batch by bucket themselves; batch_size and shuffle go to their sampler.
        if getattr(dataset, "seed", seed) != seed:
            dataset = dataset.with_seed(seed)
        env_rank, env_world = distributed_from_env()
        dataloader_kwargs.setdefault(
            "batch_sampler",
            dataset.make_batch_sampler(
                seed=seed,
                shuffle=shuffle,
                rank=env_rank if rank is None else rank,
                world_size=env_world if world_size is None else world_size,
                even_batches=even_batches,
            ),
        )
        dataloader_kwargs.setdefault("collate_fn", dataset.collate_fn)
        _tell_batch_size_ignored(batch_size, dataset)
        batch_size, shuffle = 1, False
    loader = StokerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        worker_init_fn=worker_init,
        **plan.kwargs,  # type: ignore[arg-type]  # validated by the planner
        **dataloader_kwargs,
    )
    loader.plan = plan
    loader.seed = seed
    loader._tuning = live.tuning if live is not None else None
    if monitor is True:
        loader.monitor = InputMonitor()
    elif isinstance(monitor, InputMonitor):
        loader.monitor = monitor
    return loader


def _position(sampler: Any, *, epoch_start: bool = False) -> dict[str, int]:
    """Where the run is, for a switch's record: the epoch and the batches of it handed out."""
    state = sampler.state_dict()
    return {
        "epoch": int(state["epoch"]),
        "batch_in_epoch": 0 if epoch_start else int(state["batches_done"]),
    }


def _epoch_done(sampler: Any) -> bool:
    """Whether the epoch in progress is finished: its sampler reports the next one's start (at
    least one batch of it was handed out, or no switch would be under way)."""
    return int(sampler.state_dict()["batches_done"]) == 0


_DEAD_WORKER = re.compile(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\)(.*)")
_SHM_SIGNS = (
    "No space left on device",
    "/dev/shm",
    "unable to write to file </torch_",
    "shared memory",
)


def _explain_failure(err: Exception, inner: Any, loader: StokerLoader) -> Exception:
    """Turn PyTorch's worker-failure errors into ones that say which worker, what, and the fix.

    A dead worker shows up as PyTorch's RuntimeError ("killed by signal", "exited unexpectedly")
    or, when the batch it was handing over is cut off, as a ConnectionResetError or EOFError;
    the workers' exit codes tell which one died either way.
    """
    text = str(err)
    if any(sign in text for sign in _SHM_SIGNS):
        _shutdown(inner)
        return SharedMemoryFull(
            f"workers could not hand batches to the main process: shared memory is full ({text}). "
            "Give the container more (docker run --shm-size=8g), or use fewer workers, a smaller "
            "prefetch_factor, or output='uint8' (4x fewer bytes per batch)."
        )
    match = _DEAD_WORKER.search(text)
    named = {int(p) for p in re.findall(r"\d+", match.group(1))} if match else set()
    workers = list(getattr(inner, "_workers", []))
    dead = {
        i: w
        for i, w in enumerate(workers)
        if getattr(w, "pid", None) in named or getattr(w, "exitcode", None) not in (None, 0)
    }
    if not dead:
        return err
    loading = _what_workers_loaded(inner, loader, set(dead))
    codes = {w.exitcode for w in dead.values()}
    _shutdown(inner)
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


def _what_workers_loaded(inner: Any, loader: StokerLoader, worker_ids: set[int]) -> str:
    """The samples outstanding at the given workers, as image paths when the dataset has them."""
    tasks = getattr(inner, "_task_info", {})
    sampler = loader.batch_sampler
    batch_of = getattr(sampler, "batch_of_iteration", None)
    paths = getattr(getattr(loader.dataset, "catalog", None), "paths", None)
    found: list[str] = []
    for send_index, info in sorted(tasks.items()):
        if len(info) != 1 or info[0] not in worker_ids:
            continue  # already returned, or another worker's
        batch = batch_of(send_index) if callable(batch_of) else None
        if batch is None:
            found.append(f"batch {send_index} of this epoch")
        elif paths is not None:
            found += [paths[int(key[2])] for key in batch]
        else:
            found.append(repr(list(batch)))
    found = list(dict.fromkeys(found))  # repeats put one image in several slots
    return ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") or (
        "nothing identifiable"
    )


def _start_method(loader: DataLoader) -> str:  # type: ignore[type-arg]
    context = loader.multiprocessing_context
    if context is not None:
        return str(context.get_start_method())
    return (
        torch.multiprocessing.get_start_method(allow_none=True)
        or (torch.multiprocessing.get_all_start_methods()[0])
    )


def _unwatch_worker_exits(inner: Any) -> None:
    """Take the workers off PyTorch's SIGCHLD watch list.

    PyTorch raises a dead worker's RuntimeError from its SIGCHLD handler, in whatever line the
    main thread runs at that moment: usually the user's training step, where nothing can say which
    worker died or what it held. Unwatched, a dead worker is found where it matters: the next
    batch request sees the worker is gone (PyTorch checks whenever it has waited 5 s, or the
    loader's timeout) and the loader raises ``WorkerFailed`` there.
    """
    if getattr(inner, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(inner))  # type: ignore[attr-defined]
        inner._worker_pids_set = False


def _shutdown(inner: Any) -> None:
    """Stop the remaining workers now, so none is left behind as a zombie."""
    _unwatch_worker_exits(inner)
    stop = getattr(inner, "_shutdown_workers", None)
    if callable(stop):
        try:
            stop()
        except Exception:  # shutting down after a failure must not hide the failure
            logger.debug("worker shutdown after a failure raised", exc_info=True)
