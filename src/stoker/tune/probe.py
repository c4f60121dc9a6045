"""The probe: time candidate loaders over the batches training would load, whole rounds at a time.

See ``stoker.tune`` for what one measurement is. Loaders come from an injected factory, so the
probe never imports the loader; time comes from an injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker import torch_internals
from stoker.data.protocol import BatchingDataset
from stoker.monitor import batch_samples
from stoker.plan import LoaderPlan, Measurement
from stoker.system.memory import MemoryBudget, worker_uss_bytes
from stoker.tune.rules import ABORT_BELOW, PAST_PEAK_BELOW, PREFETCH_DEFAULT, keeps_up

__all__ = ["Clock", "LoaderFactory", "Probe", "Progress", "batches_for"]

_NO_ROUND = "not measured: the time limit came before one batch per worker"

Clock = Callable[[], float]
LoaderFactory = Callable[[LoaderPlan, Iterable[Any]], Iterable[Any]]
"""Builds the loader for one candidate: ``factory(plan, batches)``; ``batches`` is the batch
sampler to use (an iterable of index lists). The loader may offer ``worker_pids()``."""
Progress = Callable[[float, float, str], None]
"""``progress(elapsed_seconds, limit_seconds, text)`` while probing."""


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


@dataclass(slots=True)
class Batches:
    """An endless stream of the batches training would load, and how many make an epoch."""

    stream: Iterator[Any]
    per_epoch: int


def batches_for(dataset: Any, batch_size: int | None, seed: int) -> Batches | None:
    """The batches of ``dataset`` epoch after epoch; ``None`` when it cannot be measured."""
    if isinstance(dataset, BatchingDataset):
        sampler = dataset.make_batch_sampler(seed=seed, shuffle=True)
        if len(sampler) == 0:
            return None
        return Batches(stream=(b for _ in count() for b in sampler), per_epoch=len(sampler))
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

    return Batches(stream=generic(), per_epoch=math.ceil(n / batch_size))


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


class Probe:
    """Measures candidates one after another within the time limit (see the module docstring)."""

    def __init__(
        self,
        *,
        factory: LoaderFactory,
        batches: Batches,
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
            if m.batches_per_second < PAST_PEAK_BELOW * self.best:
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
            if self.best and rate < ABORT_BELOW * self.best:
                return (*done, "stopped early: clearly slower than the best")
            if used >= began + (self.limit() - began) / remaining:
                return (*done, "")

    def _worker_memory(self, loader: Any, plan: LoaderPlan, batch: Any) -> int | None:
        pids = getattr(loader, "worker_pids", None)
        if plan.num_workers == 0 or not callable(pids):
            return None
        uss = worker_uss_bytes(pids(), self.root / "proc")
        if uss is None:
            return None
        # Batches in flight, or a worker's reused blocks where more (a stoker dataset's
        # `transit_block_bytes`; those blocks are /dev/shm, so RAM, that USS does not count).
        blocks = getattr(getattr(loader, "dataset", None), "transit_block_bytes", 0)
        in_flight = (plan.prefetch_factor or PREFETCH_DEFAULT) * _batch_bytes(batch)
        return uss + max(in_flight, blocks if isinstance(blocks, int) else 0)

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
    close = getattr(iterator, "close", None)  # a generator (StokerLoader) or torch's iterator
    if callable(close):
        close()
    torch_internals.shutdown_workers(iterator)


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"
