"""Measure a loader: images per second, time to first batch, epoch gaps and worker memory.

The measurement behind ``stoker bench`` and ``benchmarks/run.py``. Every function takes its clock
(``clock=time.perf_counter``) and the root of ``/proc`` as parameters, returns frozen dataclasses
and prints nothing; rendering is the caller's job.

How the figures are taken:

- **images_per_second** is the steady rate. The first batch pays for starting the workers and is
  reported on its own as **first_batch_seconds** (from ``iter(loader)`` to the first batch).
  While the first batch is made, the other workers fill the prefetch buffer (``workers *
  prefetch_factor`` batches), and those arrive at once after it; counting them would overstate
  the rate. So the first ``max(1, workers * prefetch_factor)`` batches are warm-up, and the rate is
  the images of the later batches over the time from the last warm-up batch to the last batch.
  Batches the workers finished ahead of the loop can still sit in the queue when the timed
  window opens (up to ``workers * prefetch_factor``) and arrive at once, so a short window
  overstates the rate: with 12 batches and 4 workers, 4 timed batches gave "242 images/s" on 2
  CPUs that make about 30. ``steady_batches_needed`` is the window that bounds this error to a
  seventh of the figure at worst; a shorter run carries a caveat.
- Of several runs (``repeats``) the median is kept, with every run's rate in
  ``run_images_per_second``; runs that differ by more than ``MAX_SPREAD`` of the median carry a
  caveat, and so does a rate above what the CPU budget could make at the in-process rate
  (``implausible_rates``). A measurement with caveats is not a figure to act on.
- A measurement asks for exactly the worker count it names: the loader is planned on a budget of
  at least that many CPUs, so the planner does not clamp it (measuring a count is how one learns
  whether the planner's choice is right).
- **Memory** is read from ``/proc/<pid>/smaps_rollup`` after the last batch, while the workers
  are alive: RSS, PSS (shared pages divided among the processes sharing them, so PSS adds up
  across processes) and USS (pages private to the process: what it would free on exit).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stoker import torch_internals
from stoker.errors import StokerError
from stoker.files import atomic_write
from stoker.system.memory import MemoryUse, child_pids, read_memory
from stoker.system.platform import default_start_method

__all__ = [
    "MAX_SPREAD",
    "BenchReport",
    "EpochGapMeasurement",
    "LoaderMeasurement",
    "MemoryUse",
    "WorkerGrowth",
    "bench_loader",
    "measure_epoch_gap",
    "measure_loader",
    "measure_worker_growth",
    "plot_bench",
    "read_memory",
    "implausible_rates",
    "require_plotting",
    "steady_batches_needed",
    "warmup_batches",
    "touch_catalog",
    "touch_records",
]

Clock = Callable[[], float]
_PROC = Path("/proc")

MAX_SPREAD = 0.25
"""Runs of one setting whose rates differ by more than this share of their median get a caveat."""

# PyTorch's own warning when a DataLoader has more workers than it suggests; a measurement asks for
# the count on purpose, and the report says so once instead (see bench_loader).
_TORCH_WORKER_WARNING = r"This DataLoader will create \d+ worker processes"


# --- memory --------------------------------------------------------------------------------------


def _total(uses: Sequence[MemoryUse], field: str) -> int | None:
    return sum(getattr(u, field) for u in uses) if uses else None


# --- one loader ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LoaderMeasurement:
    """What one pass of a loader cost.

    Attributes:
        workers: worker processes (0: loading in the main process).
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; ``None`` with 0 workers.
        persistent: workers kept between epochs.
        batches: batches drawn (across epochs when more than one epoch was asked for).
        warmup_batches: batches left out of ``images_per_second`` (see the module docstring).
        images: images in those batches.
        seconds: from ``iter(loader)`` to the last batch.
        first_batch_seconds: from ``iter(loader)`` to the first batch (worker start included).
        images_per_second: steady rate after the first batch (see the module docstring).
        median_batch_seconds: median time between two batches after the warm-up.
        run_images_per_second: images/s of every run of this setting (``bench_loader``
            repeats), lowest first; this measurement is the median run.
        caveats: why the figure should not be trusted, in words (empty when it can be).
        main_memory: the main process after the last batch.
        worker_memory: each worker after the last batch (empty with 0 workers).
        worker_pss_bytes: PSS of all workers together (``None`` with 0 workers or no /proc).
        worker_uss_bytes: USS of all workers together.
        total_pss_bytes: PSS of the main process and all workers: the loader's whole footprint.
    """

    workers: int
    start_method: str | None
    persistent: bool
    batches: int
    warmup_batches: int
    images: int
    seconds: float
    first_batch_seconds: float
    images_per_second: float
    median_batch_seconds: float
    main_memory: MemoryUse | None
    worker_memory: tuple[MemoryUse, ...]
    worker_pss_bytes: int | None
    worker_uss_bytes: int | None
    total_pss_bytes: int | None
    run_images_per_second: tuple[float, ...] = ()
    caveats: tuple[str, ...] = ()

    @property
    def steady_batches(self) -> int:
        """Batches inside the timed window (after the warm-up)."""
        return self.batches - self.warmup_batches


def warmup_batches(workers: int, prefetch_factor: int | None = None) -> int:
    """Batches left out of the rate: the first, plus those prefetched while it was made."""
    return max(1, workers * (prefetch_factor or 2))


def steady_batches_needed(workers: int, prefetch_factor: int | None = None) -> int:
    """Batches to draw for a rate that the prefetch queue cannot inflate by more than a seventh.

    The warm-up, then eight times as many batches as can be queued ahead (at least 20): batches
    waiting in the queue when the timed window opens arrive at once, which at worst makes 8
    batches' worth of time pass for 7 (8/7 of the true rate).
    """
    ahead = warmup_batches(workers, prefetch_factor)
    return ahead + max(20, 8 * ahead)


def _batch_images(batch: Any) -> int:
    """Images in a batch: stoker's ``images``, a tensor's first dimension, or a sequence's length."""
    if isinstance(batch, dict):
        if "images" in batch:
            return _batch_images(batch["images"])
        return _batch_images(next(iter(batch.values()))) if batch else 0
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)):
        return _batch_images(batch[0]) if batch and not isinstance(batch[0], str) else len(batch)
    return 1


def _quiet() -> dict[str, Any]:
    """``monitor=False`` where ``make_loader`` has an input monitor: it warns when training waits
    for data, which a data-only measurement does by design."""
    from stoker.loader import make_loader

    return {"monitor": False} if "monitor" in inspect.signature(make_loader).parameters else {}


def _measured_loader(
    dataset: Any,
    *,
    workers: int,
    start_method: str | None,
    persistent: bool,
    prefetch_factor: int | None,
    seed: int,
) -> Any:
    from stoker.loader import make_loader

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r} is not valid: use a whole number >= 0")
    with_workers = workers > 0
    # A budget of at least `workers` CPUs: measure the count asked for, never a clamped one.
    return make_loader(
        dataset,
        shuffle=True,
        seed=seed,
        workers=workers,
        persistent=persistent if with_workers else None,
        prefetch_factor=prefetch_factor if with_workers else None,
        start_method=start_method if with_workers else None,
        pin_memory=False,
        budget=max(workers, 2),
        **_quiet(),
    )


def _worker_memory(
    proc_root: Path, before: set[int]
) -> tuple[MemoryUse | None, tuple[MemoryUse, ...]]:
    """This process's memory and that of the children started since ``before`` was taken."""
    pids = sorted(child_pids(proc_root) - before)
    uses = (read_memory(pid, proc_root=proc_root) for pid in pids)
    return read_memory("self", proc_root=proc_root), tuple(m for m in uses if m is not None)


def _finish(loader: Any, iterator: Any, start_method: str | None) -> None:
    """Stop the workers; spawned ones only once they are idle.

    With torch 2.13, shutting spawned workers down while they still make batches makes them
    abort ("terminate called without an active exception", then "DataLoader worker is killed by
    signal: Aborted"); forked workers stop cleanly, and so do idle spawned ones. So for spawn the
    batches already asked for are collected first (untimed): with persistent workers the sampler
    is cut off so that only those few arrive; without them the epoch runs out.
    """
    inner = torch_internals.persistent_iterator(loader)  # persistent workers live here
    if loader.num_workers > 0 and (start_method or default_start_method()) != "fork":
        if inner is not None:
            torch_internals.stop_asking(inner)
        for _ in iterator:
            pass
    torch_internals.shutdown_workers(inner)


def measure_loader(
    dataset: Any,
    *,
    workers: int,
    batches: int | None = None,
    start_method: str | None = None,
    persistent: bool = True,
    prefetch_factor: int | None = None,
    seed: int = 0,
    step: Callable[[Any], object] | None = None,
    clock: Clock = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
    proc_root: Path = _PROC,
) -> LoaderMeasurement:
    """Draw ``batches`` batches from ``stoker.make_loader(dataset, ...)`` and time them.

    Args:
        dataset: a stoker dataset, or any map-style dataset.
        workers: worker processes, used as given (the planner is not asked to clamp it).
        batches: batches to draw; ``None`` for one epoch. More than an epoch continues into the
            next epochs, with the same workers when ``persistent``.
        start_method: ``multiprocessing_context`` for the workers; ``None`` for the default.
        persistent: ``persistent_workers`` (ignored with 0 workers).
        prefetch_factor: batches each worker loads ahead; ``None`` for PyTorch's 2.
        seed: the loader's shuffle and augmentation seed.
        step: called with each batch inside the timed loop, to stand in for a training step.
        clock: the time source.
        progress: ``progress(done, total)`` after each batch.
        proc_root: where ``/proc`` is, for the memory readings.

    Raises:
        ValueError: ``workers`` or ``batches`` has no meaning, or the loader has no batches.
    """
    if batches is not None and (isinstance(batches, bool) or batches < 1):
        raise ValueError(f"batches={batches!r} is not valid: use a whole number >= 1 or None")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _TORCH_WORKER_WARNING, UserWarning)
        return _measure(
            dataset,
            workers=workers,
            batches=batches,
            start_method=start_method,
            persistent=persistent,
            prefetch_factor=prefetch_factor,
            seed=seed,
            step=step,
            clock=clock,
            progress=progress,
            proc_root=proc_root,
        )


def _measure(
    dataset: Any,
    *,
    workers: int,
    batches: int | None,
    start_method: str | None,
    persistent: bool,
    prefetch_factor: int | None,
    seed: int,
    step: Callable[[Any], object] | None,
    clock: Clock,
    progress: Callable[[int, int], None] | None,
    proc_root: Path,
) -> LoaderMeasurement:
    loader = _measured_loader(
        dataset,
        workers=workers,
        start_method=start_method,
        persistent=persistent,
        prefetch_factor=prefetch_factor,
        seed=seed,
    )
    if len(loader) == 0:
        raise ValueError("the loader has no batches to measure")
    want = len(loader) if batches is None else batches
    stamps: list[float] = []
    counts: list[int] = []
    children = child_pids(proc_root)
    start = clock()
    iterator = iter(loader)
    try:
        while len(stamps) < want:
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)  # the next epoch; persistent workers are reused
                continue
            if step is not None:
                step(batch)
            stamps.append(clock())
            counts.append(_batch_images(batch))
            if progress is not None:
                progress(len(stamps), want)
        main, workers_mem = _worker_memory(proc_root, children)
    finally:
        _finish(loader, iterator, start_method)
    measurement = _loader_measurement(
        stamps,
        counts,
        start,
        workers,
        start_method,
        persistent,
        main,
        workers_mem,
        warmup_batches(workers, prefetch_factor),
    )
    needed = steady_batches_needed(workers, prefetch_factor)
    if measurement.batches < needed:
        caveat = (
            f"only {measurement.steady_batches} batches timed after a warm-up of "
            f"{measurement.warmup_batches}: batches queued ahead can inflate the rate; "
            f"measure at least {needed} batches"
        )
        measurement = dataclasses.replace(measurement, caveats=(caveat,))
    return measurement


def _loader_measurement(
    stamps: list[float],
    counts: list[int],
    start: float,
    workers: int,
    start_method: str | None,
    persistent: bool,
    main: MemoryUse | None,
    workers_mem: tuple[MemoryUse, ...],
    warmup: int,
) -> LoaderMeasurement:
    # Too few batches for a warm-up: fall back to the first batch alone as warm-up.
    warmup = warmup if warmup < len(stamps) else min(1, len(stamps) - 1)
    if warmup > 0 and stamps[-1] > stamps[warmup - 1]:
        rate = sum(counts[warmup:]) / (stamps[-1] - stamps[warmup - 1])
        steady = stamps[warmup - 1 :]
        median_interval = statistics.median(b - a for a, b in zip(steady, steady[1:], strict=False))
    else:
        total = stamps[-1] - start
        rate = sum(counts) / total if total > 0 else float("inf")
        median_interval = total
    worker_pss = _total(workers_mem, "pss_bytes")
    total_pss = None if main is None else main.pss_bytes + (worker_pss or 0)
    return LoaderMeasurement(
        workers=workers,
        start_method=start_method if workers else None,
        persistent=persistent and workers > 0,
        batches=len(stamps),
        warmup_batches=warmup,
        images=sum(counts),
        seconds=stamps[-1] - start,
        first_batch_seconds=stamps[0] - start,
        images_per_second=rate,
        median_batch_seconds=median_interval,
        main_memory=main,
        worker_memory=workers_mem,
        worker_pss_bytes=worker_pss,
        worker_uss_bytes=_total(workers_mem, "uss_bytes"),
        total_pss_bytes=total_pss,
    )


# --- epoch boundaries ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochGapMeasurement:
    """How long the training loop waits when one epoch ends and the next begins.

    Attributes:
        workers, start_method, persistent: the loader's settings.
        epochs: full epochs drawn.
        first_batch_seconds: from the first ``iter(loader)`` to the first batch.
        gap_seconds: for each boundary, from the last batch of an epoch to the first of the next.
        median_gap_seconds: the median of ``gap_seconds``.
        median_batch_seconds: the median time between two batches inside an epoch, for scale.
    """

    workers: int
    start_method: str | None
    persistent: bool
    epochs: int
    first_batch_seconds: float
    gap_seconds: tuple[float, ...]
    median_gap_seconds: float
    median_batch_seconds: float


def measure_epoch_gap(
    dataset: Any,
    *,
    workers: int,
    persistent: bool,
    start_method: str | None = None,
    epochs: int = 3,
    seed: int = 0,
    clock: Clock = time.perf_counter,
) -> EpochGapMeasurement:
    """Draw ``epochs`` whole epochs and time the gaps between them (arguments: `measure_loader`).

    Without persistent workers each epoch starts new worker processes, so the gap holds their
    start-up and their first batch; with them, only the first batch of the new epoch.

    Raises:
        ValueError: ``epochs`` is below 2 (there is no boundary to time) or ``workers`` is invalid.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs={epochs!r} is not valid: use a whole number >= 2")
    loader = _measured_loader(
        dataset,
        workers=workers,
        start_method=start_method,
        persistent=persistent,
        prefetch_factor=None,
        seed=seed,
    )
    if len(loader) == 0:
        raise ValueError("the loader has no batches to measure")
    firsts, lasts, intervals = [], [], []
    start = clock()
    for _ in range(epochs):
        stamps = [clock() for _batch in loader]
        firsts.append(stamps[0])
        lasts.append(stamps[-1])
        intervals += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    _finish(loader, iter(()), start_method)
    gaps = tuple(f - last for f, last in zip(firsts[1:], lasts, strict=False))
    return EpochGapMeasurement(
        workers=workers,
        start_method=start_method if workers else None,
        persistent=persistent and workers > 0,
        epochs=epochs,
        first_batch_seconds=firsts[0] - start,
        gap_seconds=gaps,
        median_gap_seconds=statistics.median(gaps),
        median_batch_seconds=statistics.median(intervals) if intervals else 0.0,
    )


# --- several worker counts -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    """Loader measurements over worker counts, as ``stoker bench`` shows them.

    Attributes:
        source: what was measured (the dataset's path or a label).
        budget_cpus: the CPU budget of this process when it was measured.
        repeats: runs per setting; each measurement is the run with the median images/s.
        measurements: one per (start method, worker count), in the order asked.
        notes: what the reader should know about the whole bench (more workers than CPUs).
    """

    source: str
    budget_cpus: int
    repeats: int
    measurements: tuple[LoaderMeasurement, ...]
    notes: tuple[str, ...] = ()

    def best(self) -> LoaderMeasurement:
        """The measurement with the most images per second (caveats or not)."""
        return max(self.measurements, key=lambda m: m.images_per_second)

    @property
    def reliable(self) -> bool:
        """True when no measurement carries a caveat."""
        return not any(m.caveats for m in self.measurements)


def bench_loader(
    dataset: Any,
    *,
    workers: Sequence[int],
    batches: int | None = None,
    start_methods: Sequence[str | None] = (None,),
    persistent: bool = True,
    repeats: int = 1,
    source: str = "",
    budget_cpus: int | None = None,
    clock: Clock = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
    proc_root: Path = _PROC,
) -> BenchReport:
    """`measure_loader` for each start method and worker count, ``repeats`` times each.

    0 workers is measured once whatever the start methods (no process is started). Of repeated
    runs the one with the median images/s is kept. ``progress(done, total)`` counts batches over
    the whole bench. ``budget_cpus`` defaults to ``stoker.cpu_budget().cpus``.

    Raises:
        ValueError: no worker counts, ``repeats`` below 1, or an invalid count.
    """
    if not workers:
        raise ValueError("give at least one worker count")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not valid: use a whole number >= 1")
    settings = _settings(workers, start_methods)
    if budget_cpus is None:
        from stoker.system.cpu import cpu_budget

        budget_cpus = cpu_budget().cpus
    per_run = batches if batches is not None else _epoch_batches(dataset)
    total = per_run * repeats * len(settings)
    done = 0
    results = []
    for count, method in settings:
        runs = []
        for _ in range(repeats):
            offset = done
            tick = None if progress is None else (lambda d, _t, o=offset: progress(o + d, total))
            runs.append(
                measure_loader(
                    dataset,
                    workers=count,
                    batches=per_run,
                    start_method=method,
                    persistent=persistent,
                    clock=clock,
                    progress=tick,
                    proc_root=proc_root,
                )
            )
            done += per_run
        results.append(_median_run(runs))
    over = sorted({count for count, _ in settings if count > budget_cpus})
    notes: tuple[str, ...] = ()
    if over:
        notes = (
            f"{', '.join(map(str, over))} workers: more than the CPU budget "
            f"({_counted(budget_cpus, 'CPU')}), so they share CPUs and cannot be faster than "
            "the budget allows; measured as asked (PyTorch's warning about it is left out)",
        )
    return BenchReport(
        source=source,
        budget_cpus=budget_cpus,
        repeats=repeats,
        measurements=tuple(_flag_implausible(results, budget_cpus)),
        notes=notes,
    )


def _counted(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def implausible_rates(
    measurements: Sequence[LoaderMeasurement], budget_cpus: int, slack: float = 1.5
) -> dict[int, str]:
    """Measurements faster than the CPUs could make them, by index, with the reason.

    With no workers one process makes the batches, keeping at least one CPU busy; all the
    processes of a loader share the ``c`` CPUs of the budget, so they can at best do that ``c``
    times over. A rate above ``c`` times the in-process rate (times ``slack``: in-process, the
    main process also spends time handing batches over, and a busy machine varies) was not
    produced by the CPUs: it came from batches queued ahead or from too short a run. Needs a
    0-worker measurement to compare with. A budget set below the machine (``STOKER_CPUS``) makes
    this check strict for worker counts beyond it.
    """
    base = next((m.images_per_second for m in measurements if m.workers == 0), None)
    if base is None or base <= 0:
        return {}
    ceiling = base * max(1, budget_cpus) * slack
    found: dict[int, str] = {}
    for index, m in enumerate(measurements):
        if m.workers > 0 and m.images_per_second > ceiling:
            found[index] = (
                f"{m.images_per_second:.1f} images/s is more than {_counted(budget_cpus, 'CPU')} "
                f"can make at the in-process rate of {base:.1f} images/s (at most {ceiling:.1f})"
            )
    return found


def _flag_implausible(
    measurements: list[LoaderMeasurement], budget_cpus: int
) -> list[LoaderMeasurement]:
    found = implausible_rates(measurements, budget_cpus)
    return [
        dataclasses.replace(m, caveats=(*m.caveats, found[i])) if i in found else m
        for i, m in enumerate(measurements)
    ]


def _settings(
    workers: Sequence[int], start_methods: Sequence[str | None]
) -> list[tuple[int, str | None]]:
    settings: list[tuple[int, str | None]] = []
    for method in start_methods or (None,):
        for count in workers:
            key = (count, None if count == 0 else method)
            if key not in settings:
                settings.append(key)
    return settings


def _epoch_batches(dataset: Any) -> int:
    make = getattr(dataset, "make_batch_sampler", None)
    if callable(make):
        return max(1, len(make(seed=0, shuffle=False)))
    return max(1, len(dataset))


def _median_run(runs: list[LoaderMeasurement]) -> LoaderMeasurement:
    """The run with the median rate, carrying every run's rate and a caveat when they disagree."""
    ordered = sorted(runs, key=lambda m: m.images_per_second)
    median = ordered[(len(ordered) - 1) // 2]
    rates = tuple(m.images_per_second for m in ordered)
    caveats = list(dict.fromkeys(c for m in ordered for c in m.caveats))
    if median.images_per_second > 0 and (rates[-1] - rates[0]) > MAX_SPREAD * (
        median.images_per_second
    ):
        caveats.append(
            f"runs differ by more than {MAX_SPREAD:.0%} ({rates[0]:.1f} to {rates[-1]:.1f} "
            "images/s): the machine was busy or the runs were short"
        )
    return dataclasses.replace(median, run_images_per_second=rates, caveats=tuple(caveats))


# --- catalog memory in workers --------------------------------------------------------------------


def touch_catalog(catalog: Any) -> int:
    """Read every entry of a stoker ``Catalog`` (path, caption, size, subset); returns the count.

    Benchmark-only: what a worker does to a catalog over an epoch, all at once.
    """
    paths, captions = catalog.paths, catalog.captions
    widths, heights, subset = catalog.widths, catalog.heights, catalog.subset
    chars = 0
    for i in range(len(widths)):
        chars += len(paths[i]) + len(captions[i]) + int(widths[i]) + int(heights[i])
        chars += int(subset[i])
    return len(widths)


def touch_records(records: Sequence[dict[str, Any]]) -> int:
    """Read every field of every dict in a list-of-dicts catalog; returns the count.

    Benchmark-only: the per-image dicts many training scripts keep (sd-scripts' ``ImageInfo``
    objects behave the same way: one Python object per image, with its own reference count).
    """
    chars = 0
    for record in records:
        chars += len(record["path"]) + len(record["caption"]) + record["width"] + record["height"]
        chars += record["subset"]
    return len(records)


class _TouchInWorker(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """One item per worker: read own USS, touch every entry of ``table``, read USS again."""

    def __init__(self, table: Any, touch: Callable[[Any], int], workers: int) -> None:
        self.table = table
        self.touch = touch
        self.workers = workers

    def __len__(self) -> int:
        return self.workers

    def __getitem__(self, index: int) -> dict[str, int]:
        before = read_memory("self")
        touched = self.touch(self.table)
        after = read_memory("self")
        return {
            "pid": os.getpid(),
            "touched": touched,
            "uss_before": before.uss_bytes if before else -1,
            "uss_after": after.uss_bytes if after else -1,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerGrowth:
    """What touching every catalog entry costs each worker.

    Attributes:
        workers: worker processes.
        start_method: how they were started.
        entries: entries each worker touched.
        uss_growth_bytes: for each worker, USS after touching minus USS before.
        total_uss_growth_bytes: their sum: memory the catalog made private to the workers.
        worker_pss_bytes: PSS of all workers together after touching.
        worker_uss_bytes: USS of all workers together after touching.
        seconds: from starting the loader to the last worker's answer.
    """

    workers: int
    start_method: str
    entries: int
    uss_growth_bytes: tuple[int, ...]
    total_uss_growth_bytes: int
    worker_pss_bytes: int | None
    worker_uss_bytes: int | None
    seconds: float


def measure_worker_growth(
    table: Any,
    touch: Callable[[Any], int],
    *,
    workers: int = 2,
    start_method: str = "fork",
    clock: Clock = time.perf_counter,
    proc_root: Path = _PROC,
) -> WorkerGrowth:
    """Start ``workers`` DataLoader workers that each call ``touch(table)`` once; measure memory.

    ``touch`` must be a top-level function (it is sent to the workers). Each worker reads its
    own USS before and after touching; PSS and USS of all workers are read from this process
    after every worker has answered, while the workers are still alive.

    Raises:
        ValueError: ``workers`` is below 1.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is not valid: use a whole number >= 1")
    from stoker.loader import make_loader

    children = child_pids(proc_root)
    start = clock()
    loader = make_loader(
        _TouchInWorker(table, touch, workers),
        batch_size=None,
        workers=workers,
        persistent=True,
        start_method=start_method,
        pin_memory=False,
        seed=0,
        budget=max(workers, 2),
        **_quiet(),
    )
    iterator = iter(loader)
    try:
        answers = [next(iterator) for _ in range(workers)]
        seconds = clock() - start
        _main, uses = _worker_memory(proc_root, children)
    finally:
        _finish(loader, iterator, start_method)
    growth = tuple(int(a["uss_after"]) - int(a["uss_before"]) for a in answers)
    return WorkerGrowth(
        workers=workers,
        start_method=start_method,
        entries=int(answers[0]["touched"]),
        uss_growth_bytes=growth,
        total_uss_growth_bytes=sum(growth),
        worker_pss_bytes=_total(uses, "pss_bytes"),
        worker_uss_bytes=_total(uses, "uss_bytes"),
        seconds=seconds,
    )


# --- plot ----------------------------------------------------------------------------------------


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise StokerError(
            "plotting needs matplotlib, which is not installed; "
            "install it with: pip install 'stoker[bench]'"
        ) from None
    return Figure, FigureCanvasAgg


def require_plotting() -> None:
    """Raise `StokerError` naming ``pip install 'stoker[bench]'`` when matplotlib is missing."""
    _figure_class()


def plot_bench(
    report: BenchReport, path: str | os.PathLike[str], *, planned_workers: int | None = None
) -> Path:
    """Write a PNG: images/s (left) and loader memory (right) against worker count.

    Throughput is the median run with a bar from the lowest to the highest run, on an axis from
    0; measurements with caveats are drawn hollow. The CPU budget is a labelled vertical line and
    ``planned_workers`` (stoker's choice) is ringed. Memory is the PSS of the main process and
    all workers together, and of the workers alone (dashed). One line per start method when
    several were measured. matplotlib is imported here, not at module import.

    Raises:
        StokerError: matplotlib is not installed (the message says how to install it).
        OSError: the file cannot be written.
    """
    fig = _bench_figure(report, planned_workers)
    out = Path(path)
    # Through the one atomic writer, like every other file stoker writes: never half a PNG, never
    # through a symlink planted at the target.
    atomic_write(out, lambda handle: fig.savefig(handle, format="png"))
    return out


def _bench_figure(report: BenchReport, planned_workers: int | None) -> Any:
    figure_cls, canvas_cls = _figure_class()
    fig = figure_cls(figsize=(11, 4.4), dpi=100)
    canvas_cls(fig)
    rate_ax, mem_ax = fig.subplots(1, 2)
    series = _plot_series(report)
    for label, rows in series.items():
        _plot_rates(rate_ax, rows, label)
        _plot_memory(mem_ax, rows, label, several=len(series) > 1)
    xs = sorted({m.workers for m in report.measurements})
    for ax in (rate_ax, mem_ax):
        ax.axvline(
            report.budget_cpus,
            color="tab:red",
            lw=1.5,
            ls="--",
            label=f"CPU budget ({_counted(report.budget_cpus, 'CPU')})",
        )
        ax.set_xlabel("worker processes")
        ax.set_xticks(sorted({*xs, report.budget_cpus}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if planned_workers is not None:
        _mark_choice(rate_ax, report, planned_workers)
    rate_ax.set_ylim(bottom=0, top=rate_ax.get_ylim()[1] * 1.15)
    rate_ax.set_ylabel("images per second")
    mem_ax.set_ylabel("memory, MiB (PSS)")
    runs = (
        f"median of {report.repeats} runs, bar: lowest to highest"
        if report.repeats > 1
        else ("one run each")
    )
    rate_ax.set_title(f"Throughput ({runs})", fontsize=10)
    mem_ax.set_title("Memory of the loader", fontsize=10)
    rate_ax.legend(fontsize=8, loc="lower right")
    mem_ax.legend(fontsize=8, loc="upper left")
    first = report.measurements[0]
    name = "/".join(Path(report.source).parts[-2:]) if report.source else "your dataset"
    fig.suptitle(
        f"stoker bench: loading {name} with 0 to {max(xs)} workers "
        f"({first.batches} batches per run, {report.budget_cpus}-CPU budget)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def _plot_series(report: BenchReport) -> dict[str, list[LoaderMeasurement]]:
    """Rows per start method (0 workers in each), labelled in plain words."""
    zero = [m for m in report.measurements if m.workers == 0]
    by_method: dict[str | None, list[LoaderMeasurement]] = {}
    for m in report.measurements:
        if m.workers > 0:
            by_method.setdefault(m.start_method, []).append(m)
    if len(by_method) <= 1:
        rows = zero + next(iter(by_method.values()), [])
        return {"images/s (median)": sorted(rows, key=_workers)}
    return {
        f"workers started by {method or 'the default method'}": sorted(zero + own, key=_workers)
        for method, own in by_method.items()
    }


def _workers(m: LoaderMeasurement) -> int:
    return m.workers


def _plot_rates(ax: Any, rows: list[LoaderMeasurement], label: str) -> None:
    xs = [m.workers for m in rows]
    ys = [m.images_per_second for m in rows]
    low = [y - min(m.run_images_per_second or (y,)) for m, y in zip(rows, ys, strict=True)]
    high = [max(m.run_images_per_second or (y,)) - y for m, y in zip(rows, ys, strict=True)]
    line = ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=4, label=label)
    color = line[0].get_color()
    shaky = [m for m in rows if m.caveats]
    if shaky:
        ax.plot(
            [m.workers for m in shaky],
            [m.images_per_second for m in shaky],
            ls="none",
            marker="o",
            ms=11,
            mfc="white",
            mec=color,
            label="not reliable (see the table)",
        )


def _plot_memory(ax: Any, rows: list[LoaderMeasurement], label: str, *, several: bool) -> None:
    xs = [m.workers for m in rows]
    prefix = f"{label}: " if several else ""
    total = [(m.total_pss_bytes or 0) / 2**20 for m in rows]
    line = ax.plot(xs, total, marker="o", label=f"{prefix}main process + workers")[0]
    workers = [(m.worker_pss_bytes or 0) / 2**20 for m in rows]
    ax.plot(xs, workers, ls="--", marker=".", color=line.get_color(), label=f"{prefix}workers")


def _mark_choice(ax: Any, report: BenchReport, planned_workers: int) -> None:
    chosen = [m for m in report.measurements if m.workers == planned_workers]
    if not chosen:
        return
    y = max(m.images_per_second for m in chosen)
    ax.plot(
        [planned_workers],
        [y],
        ls="none",
        marker="*",
        ms=18,
        color="gold",
        mec="black",
        zorder=5,
        label=f"stoker's choice ({_counted(planned_workers, 'worker')})",
    )
