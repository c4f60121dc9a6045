"""Measure candidate loader settings on the real dataset, pick the fewest workers that do, remember.

``tune_loader(dataset)`` is what ``workers="auto"`` (and ``prefetch_factor="auto"``) runs. It
measures through an injected clock and loader factory, so the rules below are tested with fake
ones; the planner receives the result as data (a ``MeasuredChoice``) and puts the choice, the
measurements and the reason in ``plan.defaults``.

**Candidates.** Worker counts within the CPU budget: every count up to 4, then steps of about 1.5x
(6, 8, 12, 16, 24, 32, ...), plus the budget minus one and the budget itself. A 1-CPU budget has
one candidate, 0 (see ``stoker.plan``), so nothing is measured. They are measured from the fewest
workers up, each with a fresh DataLoader over the batches the training run would load (a worker
count is fixed when a DataLoader is built, so workers cannot be carried from one count to the
next; with ``fork`` a start costs about 0.1 s and counts against the time limit). Candidates
continue through the same stream of batches, so no candidate reads files another one warmed.

**One measurement.** The first batch pays for starting the workers and is timed on its own. The
workers started first fill the queue while the main process is still starting the others, so the
next ``workers x prefetch_factor - 1`` batches are a backlog that arrives at once; they are taken
untimed. Steady state is then timed over *whole rounds*, one batch per worker (workers that start
a round together finish it together, so part of a round is a burst, not a rate). Each candidate
gets an equal part of the time left when it starts; one below half of the best rate so far after a
round is stopped early (clearly worse).

**The time limit** is the smaller of ``time_limit_seconds`` (10 s) and ``epoch_fraction`` (5%) of
one epoch. The epoch's length is estimated from the fastest rate that is still possible: the best
measured so far, or the latest candidate's rate scaled linearly to the largest count (k workers
at rate r could at best give ``r * top / k``), so the probe does not overrun 5% of an epoch even
if more workers turn out to scale perfectly. Short epochs therefore get short probes, with noisier
figures; for long epochs the 10 s cap applies. Larger
counts stop being tried once one is below 0.8x the best (past the peak), or, with a consumer
rate, as soon as one keeps up.

**The choice.**

- Without ``consumer_rate``: the fewest workers whose rate is within 5% of the best measured
  (``WITHIN_BEST = 0.95``): more workers for less than 5% more throughput are not worth their RAM.
- With ``consumer_rate`` (batches/s the training step takes): the fewest workers whose rate is at
  least ``CONSUMER_MARGIN = 1.2`` times it. The margin is there because the probe's consumer does
  nothing, while a real training step also uses CPU (collation, the copy to the GPU, logging) and
  batch times vary with image size; 20% headroom keeps the prefetch queue from draining. With 0
  workers nothing overlaps: batches load inside the training loop, which then waits ``R / (R +
  r0)`` of the time, so 0 counts as keeping up only at ``r0 >= ZERO_WORKERS_FACTOR * R`` (4x: a
  wait of at most 20%, the input-bound monitor's threshold). When no candidate keeps up, the rule
  without a consumer rate applies, and the reason says so.
- ``prefetch_factor="auto"`` also measures the chosen count with 4 batches ahead instead of 2 when
  time is left; 4 is taken only when the rule above prefers it (more throughput for the same
  workers).
- **RAM.** While each candidate runs, the memory one worker adds is read from
  ``/proc/<pid>/smaps_rollup`` (USS: its private pages) plus the batches it holds ahead. The
  available memory is ``MemAvailable`` of ``/proc/meminfo``, lowered to what the cgroup's
  ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) leaves, of this group and every ancestor;
  ``MEMORY_HEADROOM = 0.8`` of it may go to workers (the rest stays for the training process and
  the page cache). No count above ``usable // per_worker`` is measured or chosen.

**Remembered.** A choice is cached as JSON under ``cache_dir()`` (``STOKER_CACHE_DIR``, else
``$XDG_CACHE_HOME/stoker``, else ``~/.cache/stoker``), in ``tune/<key>.json``, where the key is a
digest of the dataset's fingerprint (its batch layout, image paths and sizes, buckets and subset
settings), the budget, the request, the consumer rate, the batch size and the stoker and torch
versions. A hit skips the probe unless the remembered choice no longer fits the available memory;
any change of the key measures again. Writes are atomic (a temporary file in the same folder, then
``os.replace``), so an interrupted run leaves the old file or none, never half of one. A probe that
fails leaves the cache alone, warns once (``StokerWarning``) and falls back to the default worker
count of ``stoker.plan``. Datasets without a fingerprint (anything but ``load_dataset``'s) are
measured every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.autotune.edges import tunes_live
from stoker.budget import (
    Budget,
    _ancestors,
    _cgroup_membership,
    _cgroup_mounts,
    _read_text,
)
from stoker.errors import StokerWarning
from stoker.files import atomic_write_text
from stoker.loader import _user_stacklevel, make_loader, plan_request, resolve_budget
from stoker.monitor import batch_samples
from stoker.plan import (
    LoaderPlan,
    LoaderRequest,
    MeasuredChoice,
    Measurement,
    default_workers,
    max_useful_workers,
)
from stoker.progress import ProgressBar, progress_bar

__all__ = [
    "CONSUMER_MARGIN",
    "MEMORY_HEADROOM",
    "WITHIN_BEST",
    "ZERO_WORKERS_FACTOR",
    "MemoryBudget",
    "TuneResult",
    "cache_dir",
    "candidate_workers",
    "choose",
    "memory_budget",
    "tune_loader",
]

logger = logging.getLogger("stoker")

WITHIN_BEST = 0.95
CONSUMER_MARGIN = 1.2
ZERO_WORKERS_FACTOR = 4.0
MEMORY_HEADROOM = 0.8
TIME_LIMIT_SECONDS = 10.0
EPOCH_FRACTION = 0.05
# A candidate below this share of the best rate after a round is stopped (clearly worse) ...
_ABORT_BELOW = 0.5
# ... and one below this share of the best ends the search upwards (past the peak).
_PAST_PEAK_BELOW = 0.8
_PREFETCH_DEFAULT = 2
_PREFETCH_MORE = 4
_CACHE_FORMAT = 1
_NO_ROUND = "not measured: the time limit came before one batch per worker"

Clock = Callable[[], float]
LoaderFactory = Callable[[LoaderPlan, Iterable[Any]], Iterable[Any]]
"""Builds the loader for one candidate: ``factory(plan, batches)``; ``batches`` is the batch
sampler to use (an iterable of index lists). The loader may offer ``worker_pids()``."""
Progress = Callable[[float, float, str], None]
"""``progress(elapsed_seconds, limit_seconds, text)`` while probing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBudget:
    """The memory workers may use.

    Attributes:
        available_bytes: memory available now (``None`` where it cannot be read).
        usable_bytes: ``MEMORY_HEADROOM`` of it: what workers may take.
        source: where the binding figure was read, e.g. ``/proc/meminfo MemAvailable``.
    """

    available_bytes: int | None
    usable_bytes: int | None
    source: str


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


# --- candidates and the choice (pure) ------------------------------------------------------------


def candidate_workers(budget: Budget) -> tuple[int, ...]:
    """The worker counts to try on ``budget`` (see the module docstring)."""
    top = max_useful_workers(budget)
    counts = {0, top, max(top - 1, 0)}
    step = 1
    while step <= top:
        counts.add(step)
        step = step + 1 if step < 4 else int(step * 1.5)
    return tuple(sorted(c for c in counts if c <= top))


def choose(
    measurements: Sequence[Measurement],
    *,
    consumer_rate: float | None = None,
    max_workers: int | None = None,
) -> tuple[Measurement, str]:
    """Pick among measured candidates by the rules of the module docstring.

    Args:
        measurements: the candidates (skipped ones have a rate of 0 and are ignored).
        consumer_rate: the training step's batches/s, when known.
        max_workers: the most workers the memory allows (``None``: no limit known).

    Returns:
        The chosen measurement and one sentence saying why.

    Raises:
        ValueError: no candidate was measured.
    """
    usable = [
        m
        for m in measurements
        if m.batches_per_second > 0 and (max_workers is None or m.workers <= max_workers)
    ]
    if not usable:
        raise ValueError("no candidate setting could be measured")
    ordered = sorted(usable, key=lambda m: (m.workers, m.prefetch_factor or 0))
    best = max(usable, key=lambda m: m.batches_per_second)
    table = _summary(measurements)
    capped = ""
    if max_workers is not None and any(m.workers > max_workers for m in measurements):
        capped = f"; at most {max_workers} workers fit in the available memory"
    if consumer_rate is not None:
        for m in ordered:
            if keeps_up(m, consumer_rate):
                margin = ZERO_WORKERS_FACTOR if m.workers == 0 else CONSUMER_MARGIN
                return m, (
                    f"measured {table}: the fewest workers that keep up with the training step's "
                    f"{consumer_rate:g} batches/s with a {margin:g}x margin "
                    f"({consumer_rate * margin:.3g}/s){capped}"
                )
        lead = (
            f"no candidate keeps up with the training step's {consumer_rate:g} batches/s "
            f"x{CONSUMER_MARGIN:g}, so training will wait for data; "
        )
    else:
        lead = ""
    threshold = WITHIN_BEST * best.batches_per_second
    pick = next(m for m in ordered if m.batches_per_second >= threshold)
    return pick, (
        f"{lead}measured {table}: the fewest workers within {1 - WITHIN_BEST:.0%} of the best "
        f"({best.batches_per_second:.3g} batches/s with {_label(best)}){capped}"
    )


def keeps_up(m: Measurement, consumer_rate: float) -> bool:
    """Whether ``m`` feeds a training step of ``consumer_rate`` batches/s (see the module docs)."""
    margin = ZERO_WORKERS_FACTOR if m.workers == 0 else CONSUMER_MARGIN
    return m.batches_per_second >= consumer_rate * margin


def _label(m: Measurement) -> str:
    text = f"{m.workers} worker{'' if m.workers == 1 else 's'}"
    if m.prefetch_factor not in (None, _PREFETCH_DEFAULT):
        text += f", prefetch {m.prefetch_factor}"
    return text


def _summary(measurements: Sequence[Measurement]) -> str:
    parts = [
        f"{_label(m)} {m.batches_per_second:.3g}" for m in measurements if m.batches_per_second > 0
    ]
    return ", ".join(parts) + " batches/s" if parts else "nothing"


# --- memory --------------------------------------------------------------------------------------


def parse_proc_fields(text: str) -> dict[str, int]:
    """``/proc/meminfo`` or ``/proc/<pid>/smaps_rollup`` as ``{name: bytes}`` (``Name: N kB``
    lines; a number without a unit is kept as it is; other lines, such as smaps_rollup's address
    header, are skipped)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        # Field names are one token; the header "55a...-7ff... ---p 00000000 00:00 0" is not.
        if sep and parts and parts[0].isdigit() and name and not any(c.isspace() for c in name):
            unit = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            fields[name.strip()] = int(parts[0]) * unit
    return fields


def memory_budget(*, root: str | os.PathLike[str] = "/") -> MemoryBudget:
    """The memory available to workers now (see the module docstring); ``root`` holds ``proc``."""
    base = Path(root)
    found: list[tuple[int, str]] = []
    meminfo = parse_proc_fields(_read_text(base / "proc/meminfo") or "")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "/proc/meminfo MemAvailable"))
    found += _cgroup_memory_left(base)
    if not found:
        return MemoryBudget(available_bytes=None, usable_bytes=None, source="unknown")
    available, source = min(found)
    return MemoryBudget(
        available_bytes=available,
        usable_bytes=int(available * MEMORY_HEADROOM),
        source=source,
    )


def _cgroup_memory_left(base: Path) -> list[tuple[int, str]]:
    """(limit - usage, file) for each cgroup level with a memory limit, v2 and v1."""
    v2_path, v1_paths = _cgroup_membership(base)
    v2_mount, _ = _cgroup_mounts(base)
    if v2_path is not None and v2_mount is None and (base / "sys/fs/cgroup/memory.max").exists():
        v2_mount = ("/", "/sys/fs/cgroup")
    found = []
    if v2_path is not None and v2_mount is not None:
        for folder in _ancestors(v2_path, v2_mount, base):
            left = _limit_left(folder / "memory.max", folder / "memory.current")
            if left is not None:
                found.append((left, "/" + str((folder / "memory.max").relative_to(base))))
    v1_mount = _v1_memory_mount(base)
    if "memory" in v1_paths and v1_mount is not None:
        for folder in _ancestors(v1_paths["memory"], v1_mount, base):
            left = _limit_left(folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes")
            if left is not None:
                found.append(
                    (left, "/" + str((folder / "memory.limit_in_bytes").relative_to(base)))
                )
    return found


def _limit_left(limit_path: Path, usage_path: Path) -> int | None:
    limit_text, usage_text = _read_text(limit_path), _read_text(usage_path)
    if limit_text is None or limit_text.strip() == "max":
        return None
    try:
        limit = int(limit_text.strip())
        usage = int((usage_text or "0").strip())
    except ValueError:
        return None
    if limit >= 2**60:  # cgroup v1 writes "no limit" as a huge page-aligned number
        return None
    return max(limit - usage, 0)


def _v1_memory_mount(base: Path) -> tuple[str, str] | None:
    for line in (_read_text(base / "proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        is_cgroup = sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] == "cgroup"
        if is_cgroup and "memory" in tail[2].split(","):
            return fields[3], fields[4]
    return None


def _worker_uss_bytes(pids: Sequence[int], root: Path) -> int | None:
    """The largest USS (``Private_Clean + Private_Dirty``) among ``pids``; ``None`` if unreadable."""
    sizes = []
    for pid in pids:
        fields = parse_proc_fields(_read_text(root / "proc" / str(pid) / "smaps_rollup") or "")
        if "Private_Clean" in fields or "Private_Dirty" in fields:
            sizes.append(fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))
    return max(sizes) if sizes else None


def _batch_bytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.nelement() * batch.element_size())
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, Mapping):
        return sum(_batch_bytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_batch_bytes(v) for v in batch)
    return 0


# --- batches to probe with -----------------------------------------------------------------------


@dataclass(slots=True)
class _Batches:
    """An endless stream of the batches training would load, and how many make an epoch."""

    stream: Iterator[Any]
    per_epoch: int


def _batches_for(dataset: Any, batch_size: int | None, seed: int) -> _Batches | None:
    """The batches of ``dataset`` epoch after epoch; ``None`` when it cannot be measured."""
    make = getattr(dataset, "make_batch_sampler", None)
    if callable(make):
        sampler = make(seed=seed, shuffle=True)
        if len(sampler) == 0:
            return None
        return _Batches(stream=(b for _ in count() for b in sampler), per_epoch=len(sampler))
    try:
        n = len(dataset)
    except TypeError:
        return None
    if n == 0 or batch_size is None:
        return None

    def generic() -> Iterator[list[int]]:
        for epoch in count():
            order = np.random.default_rng([seed, epoch]).permutation(n)
            for start in range(0, n, batch_size):
                yield order[start : start + batch_size].tolist()

    return _Batches(stream=generic(), per_epoch=math.ceil(n / batch_size))


class _Window:
    """A batch sampler view on the shared stream: each ``iter`` continues where the last stopped.

    ``__iter__`` is a generator, so the iterator a DataLoader creates and throws away unused
    (it calls ``iter(batch_sampler)`` twice when it starts workers) takes nothing from the stream.
    It loops instead of ``yield from``, which would close the shared stream with the window.
    """

    def __init__(self, stream: Iterator[Any]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[Any]:
        for batch in self._stream:  # noqa: UP028 -- see the docstring
            yield batch


# --- the probe -----------------------------------------------------------------------------------


class _Probe:
    """Measures candidates one after another within the time limit (see the module docstring)."""

    def __init__(
        self,
        *,
        factory: LoaderFactory,
        batches: _Batches,
        clock: Clock,
        time_limit: float,
        epoch_fraction: float,
        memory: MemoryBudget,
        root: Path,
        progress: Progress | None,
    ) -> None:
        self.factory = factory
        self.batches = batches
        self.clock = clock
        self.time_limit = time_limit
        self.epoch_fraction = epoch_fraction
        self.memory = memory
        self.root = root
        self.progress = progress
        self.start = clock()
        self.best = 0.0
        self.projected = 0.0  # the fastest rate the latest candidate suggests is possible
        self.top = 1
        self.worker_bytes: int | None = None
        self.measurements: list[Measurement] = []

    def limit(self) -> float:
        fastest = max(self.best, self.projected)
        if fastest <= 0:
            return self.time_limit
        epoch_seconds = self.batches.per_epoch / fastest
        return min(self.time_limit, self.epoch_fraction * epoch_seconds)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def max_workers(self) -> int | None:
        if self.worker_bytes is None or self.memory.usable_bytes is None:
            return None
        return self.memory.usable_bytes // max(self.worker_bytes, 1)

    def run(
        self, plans: Sequence[LoaderPlan], consumer_rate: float | None, *, reserve: int = 0
    ) -> None:
        """Measure ``plans`` in order, stopping as the module docstring says; ``reserve`` keeps
        that many shares of the time limit for candidates measured afterwards."""
        for i, plan in enumerate(plans):
            skip = self._skip_reason(plan)
            if skip:
                self.measurements.append(_skipped(plan, skip))
                break
            m = self.measure(plan, remaining=len(plans) - i + reserve)
            self.measurements.append(m)
            self.best = max(self.best, m.batches_per_second)
            if consumer_rate is not None and keeps_up(m, consumer_rate):
                break
            if m.batches_per_second < _PAST_PEAK_BELOW * self.best:
                break

    def _skip_reason(self, plan: LoaderPlan) -> str:
        if self.elapsed() >= self.limit():
            return f"not measured: the probe's time limit ({self.limit():.2g} s) was reached"
        cap = self.max_workers()
        if cap is not None and plan.num_workers > cap:
            return (
                f"not measured: {plan.num_workers} workers of about "
                f"{_mib(self.worker_bytes)} each exceed the {_mib(self.memory.usable_bytes)} "
                f"usable ({self.memory.source})"
            )
        return ""

    def measure(self, plan: LoaderPlan, *, remaining: int) -> Measurement:
        """Time one candidate (whole rounds after the first batch), reading its workers' memory."""
        loader = self.factory(plan, _Window(self.batches.stream))
        iterator = iter(loader)
        try:
            asked = self.clock()
            first = next(iterator)
            got = self.clock()
            # While the main process starts the workers, the first ones to start already fill
            # the queue (up to prefetch_factor batches each): drain that backlog, untimed.
            for _ in range(plan.num_workers * (plan.prefetch_factor or 1) - 1):
                next(iterator)
            timed = self._time_rounds(iterator, plan, self.clock(), remaining)
            memory = self._worker_memory(loader, plan, first)
        finally:
            _close(iterator)
        batches, samples, seconds, note = timed
        rate = batches / seconds if batches and seconds > 0 else 0.0
        if memory is not None:
            self.worker_bytes = max(self.worker_bytes or 0, memory)
        return Measurement(
            workers=plan.num_workers,
            prefetch_factor=plan.prefetch_factor,
            batches_per_second=rate,
            samples_per_second=samples / seconds if batches and seconds > 0 else 0.0,
            batches=batches,
            first_batch_seconds=got - asked,
            worker_memory_bytes=memory,
            note=note,
        )

    def _time_rounds(
        self, iterator: Iterator[Any], plan: LoaderPlan, first_at: float, remaining: int
    ) -> tuple[int, int, float, str]:
        """Batches, samples and seconds up to the last whole round, and why timing stopped.

        Only whole rounds count: a rate over part of a round counts the burst of batches the
        workers finished together and overstates what they sustain (batch 2 of 2 workers can
        arrive microseconds after batch 1). So the time limit is estimated from whole rounds too,
        and a candidate that the limit cuts before its first whole round has no rate (0).
        """
        round_size = max(plan.num_workers, 1)
        scale = max(self.top, 1) / round_size if plan.num_workers < self.top else 1.0
        began = first_at - self.start
        batches = samples = 0
        done: tuple[int, int, float] = (0, 0, 0.0)  # at the last whole round
        rate = 0.0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return (*done, "the loader ran out of batches")
            now = self.clock()
            batches += 1
            samples += batch_samples(batch)
            used = now - self.start
            if batches % round_size:
                if used >= self.limit():
                    note = "stopped at the time limit" if done[0] else _NO_ROUND
                    return (*done, note)
                continue
            done = (batches, samples, max(now - first_at, 1e-9))
            rate = batches / done[2]
            if batches < max(3, 2 * round_size):
                continue  # one round can still be a burst: trust two, and at least 3 batches
            self.projected = rate * scale
            self._report(used, plan, rate)
            if self.best and rate < _ABORT_BELOW * self.best:
                return (*done, "stopped early: clearly slower than the best")
            if used >= began + (self.limit() - began) / remaining:
                return (*done, "")

    def _worker_memory(self, loader: Any, plan: LoaderPlan, batch: Any) -> int | None:
        pids = getattr(loader, "worker_pids", None)
        if plan.num_workers == 0 or not callable(pids):
            return None
        uss = _worker_uss_bytes(pids(), self.root)
        if uss is None:
            return None
        return uss + (plan.prefetch_factor or _PREFETCH_DEFAULT) * _batch_bytes(batch)

    def _report(self, used: float, plan: LoaderPlan, rate: float) -> None:
        if self.progress is not None:
            self.progress(used, self.limit(), f"{_label_plan(plan)}: {rate:.3g} batches/s")


def _skipped(plan: LoaderPlan, note: str) -> Measurement:
    return Measurement(
        workers=plan.num_workers,
        prefetch_factor=plan.prefetch_factor,
        batches_per_second=0.0,
        samples_per_second=0.0,
        batches=0,
        first_batch_seconds=0.0,
        note=note,
    )


def _label_plan(plan: LoaderPlan) -> str:
    return f"workers={plan.num_workers}" + (
        f" prefetch={plan.prefetch_factor}" if plan.prefetch_factor else ""
    )


def _close(iterator: Any) -> None:
    """End a candidate's iteration now, so its workers exit before the next one starts."""
    close = getattr(iterator, "close", None)
    if callable(close):
        close()
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


# --- the cache -----------------------------------------------------------------------------------


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where stoker remembers things: ``STOKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/stoker``, else
    ``~/.cache/stoker``. The one function that reads these variables."""
    env = os.environ if environ is None else environ
    if env.get("STOKER_CACHE_DIR"):
        return Path(env["STOKER_CACHE_DIR"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "stoker"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".cache" / "stoker"


def dataset_fingerprint(dataset: Any) -> str | None:
    """A digest of what makes loading ``dataset`` fast or slow; ``None`` for datasets other than
    ``load_dataset``'s (they are measured every time)."""
    catalog = getattr(dataset, "catalog", None)
    make = getattr(dataset, "make_batch_sampler", None)
    if catalog is None or not callable(make):
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(make(seed=0, shuffle=False).state_dict()["fingerprint"]).encode())
    blob, offsets = catalog.paths.__getstate__()
    digest.update(blob)
    digest.update(np.asarray(offsets, "<i8").tobytes())
    for name in ("widths", "heights"):
        digest.update(np.asarray(getattr(catalog, name), "<i8").tobytes())
    for name in ("bucket_wh", "resized_wh"):
        digest.update(np.asarray(getattr(dataset, name, np.zeros(0)), "<i8").tobytes())
    settings = (
        type(dataset).__qualname__,
        getattr(dataset, "output", None),
        getattr(dataset, "fast_decode", None),
        repr(getattr(catalog, "subsets", ())),
        repr(getattr(dataset, "datasets", ())),
    )
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def _cache_key(
    fingerprint: str,
    request: LoaderRequest,
    budget: Budget,
    consumer_rate: float | None,
    batch_size: int | None,
) -> dict[str, Any]:
    import stoker  # at call time: stoker/__init__ imports this module

    return {
        "stoker": stoker.__version__,
        "torch": torch.__version__,
        "dataset": fingerprint,
        "budget": {"cpus": budget.cpus, "node_cpus": budget.node_cpus, "ranks": budget.local_ranks},
        "request": dataclasses.asdict(request),
        "consumer_rate": consumer_rate,
        "batch_size": batch_size,
    }


def _cache_path(folder: Path, key: Mapping[str, Any]) -> Path:
    text = json.dumps(key, sort_keys=True)
    return folder / "tune" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _read_cache(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing, or not ours: measure again and overwrite it
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or data.get("key") != key:
        return None
    return data


def _choice_from(data: Mapping[str, Any]) -> MeasuredChoice:
    raw = data["choice"]
    return MeasuredChoice(
        workers=int(raw["workers"]),
        prefetch_factor=raw["prefetch_factor"],
        reason=str(raw["reason"]),
        measurements=tuple(Measurement(**m) for m in raw["measurements"]),
    )


# --- the entry point -----------------------------------------------------------------------------


def tune_loader(
    dataset: Any,
    *,
    request: LoaderRequest | None = None,
    batch_size: int | None = 1,
    budget: Budget | int | None = None,
    consumer_rate: float | None = None,
    seed: int = 0,
    cache: bool = True,
    loader_kwargs: Mapping[str, Any] | None = None,
    time_limit_seconds: float = TIME_LIMIT_SECONDS,
    epoch_fraction: float = EPOCH_FRACTION,
    clock: Clock = time.perf_counter,
    loader_factory: LoaderFactory | None = None,
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
        loader_kwargs: further DataLoader arguments (``collate_fn``, ...) the loaders probed use.
        time_limit_seconds, epoch_fraction: the probe's time limit (the smaller of the two).
        clock, loader_factory: the seams for tests; the factory builds one candidate's loader.
        progress: ``progress(elapsed, limit, text)``; ``None``: a bar on stderr when it is a
            terminal; ``False``: none.
        root, environ: where ``/proc`` and ``/sys`` are, and the environment (for the cache).

    Raises:
        ValueError: ``consumer_rate`` is not a positive number.
    """
    began = clock()
    request = request if request is not None else LoaderRequest(workers="auto")
    _check_consumer_rate(consumer_rate)
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
    if loader_factory is None and tunes_live(request, dataset, budget, loader_kwargs or {}):
        return _tune_live(context, seed, cache, loader_kwargs or {})  # stoker.autotune
    fingerprint = dataset_fingerprint(dataset) if cache else None
    path = None
    if fingerprint is not None:
        key = _cache_key(fingerprint, request, budget, consumer_rate, batch_size)
        path = _cache_path(cache_dir(environ), key)
        hit = _read_cache(path, key)
        if hit is not None and _fits(hit, memory):
            return context.result(_remembered(hit, path), hit, cached=True, path=path)
    factory = loader_factory or _default_factory(dataset, seed, loader_kwargs or {})
    batches = _batches_for(dataset, batch_size, seed)
    if batches is None or _nothing_to_measure(request, budget):
        return context.unmeasured(batches is None)
    own_bar = _stderr_bar() if progress is None or progress is True else None
    bar: Progress | None = own_bar if progress is None or progress is True else (progress or None)
    probe = _Probe(
        factory=factory,
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
        "format": _CACHE_FORMAT,
        "choice": dataclasses.asdict(choice),
        "worker_memory_bytes": probe.worker_bytes,
        "probe_seconds": probe.elapsed(),
        "time_limit_seconds": probe.limit(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if path is not None:
        _remember(path, {**record, "key": key})
    return context.result(choice, record, cached=False, path=path)


# --- live tuning (stoker.autotune): a stoker dataset is tuned by running its loader ---------------


def _tune_live(
    context: _Context, seed: int, cache: bool, loader_kwargs: Mapping[str, Any]
) -> TuneResult:
    """``tune_loader`` for a dataset the loader tunes live: the same loader and rules, over up to
    two epochs, with no consumer (or one that sleeps ``1 / consumer_rate`` s per batch)."""
    from stoker.autotune.driver import measurements_of
    from stoker.autotune.offline import run_without_training

    loader = make_loader(
        context.dataset,
        workers="auto",
        persistent=context.request.persistent,
        pin_memory=context.request.pin_memory,
        timeout=context.request.timeout,
        start_method=context.request.start_method,
        seed=seed,
        budget=context.budget,
        monitor=False,
        **{k: v for k, v in loader_kwargs.items() if k != "batch_sampler"},
    )
    tuning = loader._tuning
    assert tuning is not None  # tunes_live() said the loader would have one
    if not cache:
        tuning.tuner.remembered, tuning.remember, tuning.cache_path = None, None, None
    run = run_without_training(loader, consumer_rate=context.consumer_rate, clock=context.clock)
    decision = run.decision
    choice = MeasuredChoice(
        workers=decision.workers,
        prefetch_factor=None,
        reason=decision.reason if run.settled else f"{decision.reason} ({run.stopped})",
        measurements=measurements_of(decision, _PREFETCH_DEFAULT),
    )
    return TuneResult(
        choice=choice,
        plan=plan_request(context.request, budget=context.budget, warn=False, measured=choice),
        memory=context.memory,
        worker_memory_bytes=None,
        max_workers_by_memory=None,
        probe_seconds=run.seconds,
        seconds=context.clock() - context.began,
        time_limit_seconds=run.max_seconds,
        consumer_rate=context.consumer_rate,
        cached=decision.reason.startswith("remembered"),
        cache_path=tuning.cache_path,
    )


def _check_consumer_rate(rate: object) -> None:
    if rate is None:
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        raise ValueError(
            f"consumer_rate={rate!r} is not valid: give the training step's speed in batches "
            "per second (a number > 0), or None when it is not known"
        )


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not stop tuning
        return False


def _nothing_to_measure(request: LoaderRequest, budget: Budget) -> bool:
    # One CPU: the planner's rule (0 workers, or 1 with CUDA) beats any probe, whose consumer
    # cannot show the GPU wait that makes the one worker worth it.
    if budget.cpus <= 1:
        return True
    return request.workers != "auto" and request.workers in (0, None)


def _run_probe(
    probe: _Probe, request: LoaderRequest, budget: Budget, consumer_rate: float | None
) -> MeasuredChoice:
    """Measure worker counts (and prefetch factors when asked), then choose."""
    prefetch = request.prefetch_factor
    base_prefetch = prefetch if isinstance(prefetch, int) else _PREFETCH_DEFAULT
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
        more = _candidate_plan(request, budget, pick.workers, _PREFETCH_MORE)
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


def _default_factory(dataset: Any, seed: int, loader_kwargs: Mapping[str, Any]) -> LoaderFactory:
    """Candidates built by ``make_loader`` itself, unmonitored, over the probe's batches."""
    extra = {
        k: v for k, v in loader_kwargs.items() if k not in ("sampler", "batch_sampler", "drop_last")
    }

    def build(plan: LoaderPlan, batches: Iterable[Any]) -> Iterable[Any]:
        request = plan.as_request()
        return make_loader(
            dataset,
            batch_size=1,
            workers=request.workers,
            persistent=False,
            prefetch_factor=request.prefetch_factor,
            pin_memory=request.pin_memory,
            timeout=request.timeout,
            start_method=request.start_method,
            seed=seed,
            budget=plan.budget,
            monitor=False,
            batch_sampler=batches,
            **extra,
        )

    return build


def _fits(data: Mapping[str, Any], memory: MemoryBudget) -> bool:
    """Whether a remembered choice still fits the memory available now."""
    per_worker = data.get("worker_memory_bytes")
    workers = int(data["choice"]["workers"])
    if per_worker is None or memory.usable_bytes is None or workers == 0:
        return True
    return bool(workers * int(per_worker) <= memory.usable_bytes)


def _remembered(data: Mapping[str, Any], path: Path) -> MeasuredChoice:
    choice = _choice_from(data)
    note = f" (remembered from a probe on {data.get('created', '?')}: {path})"
    return dataclasses.replace(choice, reason=choice.reason + note)


def _remember(path: Path, record: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    except OSError as err:
        message = (
            f"stoker could not remember the measured loader settings in {path} ({err}); the next "
            "run measures again. Set STOKER_CACHE_DIR to a writable folder."
        )
        logger.warning(message)
        warnings.warn(message, StokerWarning, stacklevel=_user_stacklevel())


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
        workers = default_workers(self.budget, accelerator=_cuda_available())
        choice = MeasuredChoice(workers=workers, prefetch_factor=None, reason=f"{why}; default")
        return self.result(choice, {}, cached=False, path=None)

    def failed(self, err: Exception, probe: _Probe) -> TuneResult:
        workers = default_workers(self.budget)
        failure = f"{type(err).__name__}: {err}"
        reason = (
            f"the probe failed ({failure}), so the default for a budget of {self.budget.cpus} "
            f"CPUs: {workers} workers; nothing was cached, the next run measures again"
        )
        message = f"stoker could not measure workers='auto' on this dataset: {reason}"
        logger.warning(message)
        warnings.warn(message, StokerWarning, stacklevel=_user_stacklevel())
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
