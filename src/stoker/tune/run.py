"""``tune``: the entry point of measuring ``workers="auto"``, from the remembered choice or the probe."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.data.protocol import BatchingDataset
from stoker.plan import LoaderPlan, LoaderRequest, MeasuredChoice, Measurement, default_workers
from stoker.planning import plan_request, resolve_budget
from stoker.progress import ProgressBar, progress_bar
from stoker.system.cpu import Budget
from stoker.system.memory import MemoryBudget, memory_budget
from stoker.system.platform import cuda_available
from stoker.tune.probe import Clock, LoaderFactory, Probe, Progress, batches_for
from stoker.tune.remember import (
    CACHE_FORMAT,
    cache_dir,
    cache_key,
    cache_path,
    fits,
    read_cache,
    remember,
    remembered,
)
from stoker.tune.rules import (
    EPOCH_FRACTION,
    PREFETCH_DEFAULT,
    PREFETCH_MORE,
    TIME_LIMIT_SECONDS,
    candidate_workers,
    check_consumer_rate,
    choose,
    keeps_up,
    nothing_to_measure,
)
from stoker.warn import warn

__all__ = ["TuneResult", "tune"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TuneResult:
    """What ``tune_loader`` measured and chose.

    Attributes:
        choice: the choice handed to the planner (on a failed probe: the default, and why).
        plan: the plan it gives for the request and budget.
        memory: the memory budget it respected.
        worker_memory_bytes: the largest memory one worker added in any candidate (``None``
            when no worker ran or ``/proc`` could not tell).
        max_workers_by_memory: the most workers that fit in ``memory.usable_bytes``.
        probe_seconds: what the probe cost when it ran (remembered with the choice).
        seconds: what this call cost (on a cache hit: the lookup).
        time_limit_seconds: the probe's time limit as it ended (see the module docstring).
        consumer_rate: the training step's batches/s the choice had to keep up with.
        cached: the choice came from the cache, without probing.
        cache_path: the cache file read or written (``None`` when not cached).
        failure: why the probe failed, when it did.
    """

    choice: MeasuredChoice
    plan: LoaderPlan
    memory: MemoryBudget
    worker_memory_bytes: int | None
    max_workers_by_memory: int | None
    probe_seconds: float
    seconds: float
    time_limit_seconds: float
    consumer_rate: float | None
    cached: bool
    cache_path: str | None
    failure: str | None = None

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        """Every candidate measured, in order."""
        return self.choice.measurements


# --- the entry point -----------------------------------------------------------------------------


def tune(
    dataset: Any,
    *,
    loader_factory: LoaderFactory,
    request: LoaderRequest | None = None,
    batch_size: int | None = 1,
    budget: Budget | int | None = None,
    consumer_rate: float | None = None,
    seed: int = 0,
    cache: bool = True,
    time_limit_seconds: float = TIME_LIMIT_SECONDS,
    epoch_fraction: float = EPOCH_FRACTION,
    clock: Clock = time.perf_counter,
    progress: Progress | bool | None = None,
    root: str | os.PathLike[str] = "/",
    environ: Mapping[str, str] | None = None,
) -> TuneResult:
    """Measure ``dataset`` and choose ``workers="auto"`` (rules: the module docstring).

    Args:
        dataset: a ``load_dataset`` dataset, or any map-style dataset with ``len``.
        request: the request to tune; default ``LoaderRequest(workers="auto")``. Only fields given
            as ``"auto"`` are measured; the others are kept as asked.
        batch_size: batch size for datasets other than ``load_dataset``'s (theirs is in the config).
        budget: a ``Budget``, a CPU count, or ``None`` to measure it.
        consumer_rate: the training step's speed in batches/s, when known.
        seed: the seed of the batch order probed (the same batches training will load).
        cache: read and write the cache under ``cache_dir(environ)``.
        time_limit_seconds, epoch_fraction: the probe's time limit (the smaller of the two).
        loader_factory: builds one candidate's loader (``make_loader``'s module hands one in).
        clock: the seam for tests.
        progress: ``progress(elapsed, limit, text)``; ``None``: a bar on stderr when it is a
            terminal; ``False``: none.
        root, environ: where ``/proc`` and ``/sys`` are, and the environment (for the cache).

    Raises:
        ValueError: ``consumer_rate`` is not a positive number.
    """
    began = clock()
    request = request if request is not None else LoaderRequest(workers="auto")
    check_consumer_rate(consumer_rate)
    budget = resolve_budget(budget)
    memory = memory_budget(root=root)
    context = _Context(
        dataset=dataset,
        request=request,
        batch_size=batch_size,
        budget=budget,
        consumer_rate=consumer_rate,
        memory=memory,
        clock=clock,
        began=began,
    )
    fingerprint = dataset.fingerprint() if cache and isinstance(dataset, BatchingDataset) else None
    path = None
    if fingerprint is not None:
        key = cache_key(fingerprint, request, budget, consumer_rate, batch_size)
        path = cache_path(cache_dir(environ), key)
        hit = read_cache(path, key)
        if hit is not None and fits(hit, memory):
            return context.result(remembered(hit, path), hit, cached=True, path=path)
    batches = batches_for(dataset, batch_size, seed)
    if batches is None or nothing_to_measure(request, budget):
        return context.unmeasured(batches is None)
    own_bar = _stderr_bar() if progress is None or progress is True else None
    bar: Progress | None = own_bar if progress is None or progress is True else (progress or None)
    probe = Probe(
        factory=loader_factory,
        batches=batches,
        clock=clock,
        time_limit=time_limit_seconds,
        epoch_fraction=epoch_fraction,
        memory=memory,
        root=Path(root),
        progress=bar,
    )
    try:
        choice = _run_probe(probe, request, budget, consumer_rate)
    except Exception as err:  # a probe that fails must not stop training: fall back, and say so
        return context.failed(err, probe)
    finally:
        if own_bar is not None:
            own_bar.close()
    record = {
        "format": CACHE_FORMAT,
        "choice": dataclasses.asdict(choice),
        "worker_memory_bytes": probe.worker_bytes,
        "probe_seconds": probe.elapsed(),
        "time_limit_seconds": probe.limit(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if path is not None:
        remember(path, {**record, "key": key})
    return context.result(choice, record, cached=False, path=path)


def _run_probe(
    probe: Probe, request: LoaderRequest, budget: Budget, consumer_rate: float | None
) -> MeasuredChoice:
    """Measure worker counts (and prefetch factors when asked), then choose."""
    prefetch = request.prefetch_factor
    base_prefetch = prefetch if isinstance(prefetch, int) else PREFETCH_DEFAULT
    if request.workers == "auto":
        counts = candidate_workers(budget)
    else:
        counts = (_candidate_plan(request, budget, request.workers, base_prefetch).num_workers,)
    plans = [_candidate_plan(request, budget, k, base_prefetch) for k in counts]
    probe.top = max(p.num_workers for p in plans)
    probe.run(plans, consumer_rate, reserve=1 if prefetch == "auto" else 0)
    pick, reason = choose(
        probe.measurements, consumer_rate=consumer_rate, max_workers=probe.max_workers()
    )
    fed = consumer_rate is not None and keeps_up(pick, consumer_rate)
    if prefetch == "auto" and pick.workers > 0 and not fed and probe.elapsed() < probe.limit():
        more = _candidate_plan(request, budget, pick.workers, PREFETCH_MORE)
        probe.measurements.append(probe.measure(more, remaining=1))
        pick, reason = choose(
            probe.measurements, consumer_rate=consumer_rate, max_workers=probe.max_workers()
        )
    return MeasuredChoice(
        workers=pick.workers,
        prefetch_factor=pick.prefetch_factor if prefetch == "auto" else None,
        reason=reason,
        measurements=tuple(probe.measurements),
    )


def _candidate_plan(
    request: LoaderRequest, budget: Budget, workers: Any, prefetch: int
) -> LoaderPlan:
    """The plan of one candidate: the request with a fixed worker count, never persistent."""
    return plan_request(
        dataclasses.replace(
            request,
            workers=workers if isinstance(workers, int) else 0,
            prefetch_factor=prefetch,
            persistent=False,
        ),
        budget=budget,
        warn=False,
    )


@dataclass(slots=True)
class _Context:
    """What every way out of ``tune_loader`` needs to build its ``TuneResult``."""

    dataset: Any
    request: LoaderRequest
    batch_size: int | None
    budget: Budget
    consumer_rate: float | None
    memory: MemoryBudget
    clock: Clock
    began: float

    def result(
        self,
        choice: MeasuredChoice,
        record: Mapping[str, Any],
        *,
        cached: bool,
        path: Path | None,
        failure: str | None = None,
    ) -> TuneResult:
        per_worker = record.get("worker_memory_bytes")
        usable = self.memory.usable_bytes
        return TuneResult(
            choice=choice,
            plan=plan_request(self.request, budget=self.budget, warn=False, measured=choice),
            memory=self.memory,
            worker_memory_bytes=per_worker,
            max_workers_by_memory=usable // max(per_worker, 1) if per_worker and usable else None,
            probe_seconds=float(record.get("probe_seconds", 0.0)),
            seconds=self.clock() - self.began,
            time_limit_seconds=float(record.get("time_limit_seconds", 0.0)),
            consumer_rate=self.consumer_rate,
            cached=cached,
            cache_path=str(path) if path is not None else None,
            failure=failure,
        )

    def unmeasured(self, no_batches: bool) -> TuneResult:
        why = (
            "this dataset cannot be measured (no len(), no batches, or batch_size=None)"
            if no_batches
            else "the CPU budget is 1: nothing to measure, the planner's 1-CPU rule applies"
        )
        workers = default_workers(self.budget, accelerator=cuda_available())
        choice = MeasuredChoice(workers=workers, prefetch_factor=None, reason=f"{why}; default")
        return self.result(choice, {}, cached=False, path=None)

    def failed(self, err: Exception, probe: Probe) -> TuneResult:
        workers = default_workers(self.budget)
        failure = f"{type(err).__name__}: {err}"
        reason = (
            f"the probe failed ({failure}), so the default for a budget of {self.budget.cpus} "
            f"CPUs: {workers} workers; nothing was cached, the next run measures again"
        )
        message = f"stoker could not measure workers='auto' on this dataset: {reason}"
        warn(message)
        choice = MeasuredChoice(
            workers=workers,
            prefetch_factor=None,
            reason=reason,
            measurements=tuple(probe.measurements),
        )
        record = {"worker_memory_bytes": probe.worker_bytes, "probe_seconds": probe.elapsed()}
        return self.result(choice, record, cached=False, path=None, failure=failure)


def _stderr_bar() -> ProgressBar | None:
    """A one-line bar on stderr while probing, or ``None`` when stderr is not a terminal."""
    return progress_bar("stoker: measuring workers", unit="s")
