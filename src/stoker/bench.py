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
  Draw several times the warm-up (``batches``) for a steady figure.
- A measurement asks for exactly the worker count it names: the loader is planned on a budget of
  at least that many CPUs, so the planner does not clamp it (measuring a count is how one learns
  whether the planner's choice is right).
- **Memory** is read from ``/proc/<pid>/smaps_rollup`` after the last batch, while the workers
  are alive: RSS, PSS (shared pages divided among the processes sharing them, so PSS adds up
  across processes) and USS (pages private to the process: what it would free on exit).
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stoker import torch_internals
from stoker.errors import StokerError
from stoker.system.memory import MemoryUse, child_pids, read_memory
from stoker.system.platform import default_start_method

__all__ = [
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
    "require_plotting",
    "touch_catalog",
    "touch_records",
]

Clock = Callable[[], float]
_PROC = Path("/proc")


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
    warmup = max(1, workers * (prefetch_factor or 2))
    return _loader_measurement(
        stamps, counts, start, workers, start_method, persistent, main, workers_mem, warmup
    )


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
    """

    source: str
    budget_cpus: int
    repeats: int
    measurements: tuple[LoaderMeasurement, ...]

    def best(self) -> LoaderMeasurement:
        """The measurement with the most images per second."""
        return max(self.measurements, key=lambda m: m.images_per_second)


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
    return BenchReport(
        source=source, budget_cpus=budget_cpus, repeats=repeats, measurements=tuple(results)
    )


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
    ordered = sorted(runs, key=lambda m: m.images_per_second)
    return ordered[(len(ordered) - 1) // 2]


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


def plot_bench(report: BenchReport, path: str | os.PathLike[str]) -> Path:
    """Write a PNG: images/s (left) and loader memory (right) against worker count.

    One line per start method; memory is the PSS of the main process and all workers together,
    with the workers' share dashed. matplotlib is imported here, not at module import.

    Raises:
        StokerError: matplotlib is not installed (the message says how to install it).
    """
    figure_cls, canvas_cls = _figure_class()
    fig = figure_cls(figsize=(9, 3.6), dpi=100)
    canvas_cls(fig)
    rate_ax, mem_ax = fig.subplots(1, 2)
    by_method: dict[str, list[LoaderMeasurement]] = {}
    zero = [m for m in report.measurements if m.workers == 0]
    for m in report.measurements:
        if m.workers > 0:
            by_method.setdefault(m.start_method or "default", []).append(m)
    for method, own in (by_method or {"in-process": []}).items():
        rows = sorted(zero + own, key=lambda m: m.workers)
        xs = [m.workers for m in rows]
        rate_ax.plot(xs, [m.images_per_second for m in rows], marker="o", label=method)
        mib = [(m.total_pss_bytes or 0) / 2**20 for m in rows]
        line = mem_ax.plot(xs, mib, marker="o", label=f"{method} total")[0]
        workers_mib = [(m.worker_pss_bytes or 0) / 2**20 for m in rows]
        mem_ax.plot(xs, workers_mib, ls="--", color=line.get_color(), label=f"{method} workers")
    for ax in (rate_ax, mem_ax):
        ax.axvline(report.budget_cpus, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("workers (dotted: CPU budget)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    rate_ax.set_ylabel("images / s (steady)")
    mem_ax.set_ylabel("PSS, MiB")
    rate_ax.set_title("throughput")
    mem_ax.set_title("memory (main + workers)")
    rate_ax.legend(fontsize=8)
    mem_ax.legend(fontsize=8)
    fig.suptitle(report.source or "stoker bench", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
