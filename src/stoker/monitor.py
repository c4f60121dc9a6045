"""Say when training waits for data: per-batch wait times, loader statistics, one warning.

``StokerLoader`` times each ``next()`` on its DataLoader iterator (the **wait**: how long the
training loop was blocked on data) and the time from handing out one batch to asking for the next
(the **step**: the training loop's own work). ``InputMonitor`` keeps the totals and a rolling
window, and ``loader.stats()`` returns them as a ``LoaderStats``.

**The warning rule.** The first ``warmup_batches`` batches of every epoch are left out of the
window (workers start and fill their queues then, so waiting is expected). The window is the last
``window_batches`` batches or the last ``window_seconds`` of wall time, whichever holds more. Once
it is full, if the training loop waited more than ``threshold`` of the window's wall time, and its
steps took at least ``min_step_seconds`` on average, the monitor warns once per loader with a
``StokerWarning`` that names the fraction and a concrete next step (more workers while the CPU
budget allows, ``output="uint8"``, fast decoding, caching latents).

Defaults: ``threshold=0.2`` over ``window_batches=50`` and ``window_seconds=10`` after
``warmup_batches=5``, ``min_step_seconds=0.01``. A GPU idle a fifth of the time for 50 steps and
10 s is worth acting on; the window smooths out a single slow batch and a short stall (a cold page
cache at the start). Diffusion training steps take tens to hundreds of milliseconds; a loop whose
steps take under 10 ms on average is not one (a benchmark, a dataset check, ``stoker demo``): it
always waits, and is not told. ``InputMonitor(min_step_seconds=0, window_seconds=0)`` watches
such loops too.

The cost per batch is two clock reads and a few additions (the figure is in docs/tuning.md,
measured by ``benchmarks/tune.py``), so monitoring stays on by default; ``make_loader(...,
monitor=False)`` turns it off.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stoker.errors import Problem

__all__ = ["InputMonitor", "LoaderStats"]

logger = logging.getLogger("stoker")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoaderStats:
    """What a loader delivered so far, and how long the training loop waited for it.

    Attributes:
        batches: batches handed to the training loop (all epochs).
        samples: samples in those batches (where a batch's size can be told, else batches).
        wait_seconds: time the training loop spent blocked in ``next()`` for a batch.
        step_seconds: time between handing out a batch and asking for the next one (the loop's
            own work); the first request of each epoch has no step before it.
        wall_seconds: ``wait_seconds + step_seconds``.
        wait_fraction: ``wait_seconds / wall_seconds`` (0.0 before any batch).
        window_wait_fraction: the same over the last ``window_batches`` batches after warm-up;
            ``None`` until the window is full.
        batches_per_second: batches over wall time: what training actually consumed.
        samples_per_second: the same, in samples.
        consumer_batches_per_second: how fast the training loop alone would go (batches over step
            time); pass it as ``consumer_rate`` to ``workers="auto"`` on the next run.
        workers: worker processes of the loader (0: loading in the main process).
        errors_by_worker: files replaced after a decode failure, counted per worker (one entry for
            the main process when there are no workers). Batch ``k`` of an epoch comes from worker
            ``k % workers``, as PyTorch hands out indices round robin.
        decode_problems: every file replaced after a decode failure (``dataset.decode_problems``).
        warned: whether the input-bound warning was given.
    """

    batches: int
    samples: int
    wait_seconds: float
    step_seconds: float
    wall_seconds: float
    wait_fraction: float
    window_wait_fraction: float | None
    batches_per_second: float
    samples_per_second: float
    consumer_batches_per_second: float | None
    workers: int
    errors_by_worker: tuple[int, ...]
    decode_problems: tuple[Problem, ...] = ()
    warned: bool = False


class InputMonitor:
    """Wait and step times of one loader, with the input-bound rule (see the module docstring).

    Args:
        clock: seconds, monotonic; injected for tests.
        window_batches, window_seconds: the rolling window: at least this many batches and
            this much wall time.
        threshold: the window's wait fraction above which the monitor warns.
        warmup_batches: batches at the start of each epoch left out of the window.
        min_step_seconds: the mean step time below which the loop is not a training loop.
    """

    def __init__(
        self,
        *,
        clock: Clock = time.perf_counter,
        window_batches: int = 50,
        window_seconds: float = 10.0,
        threshold: float = 0.2,
        warmup_batches: int = 5,
        min_step_seconds: float = 0.01,
    ) -> None:
        if window_batches < 1 or warmup_batches < 0 or not 0.0 < threshold < 1.0:
            raise ValueError(
                "InputMonitor needs window_batches >= 1, warmup_batches >= 0 and a threshold "
                f"between 0 and 1, got {window_batches}, {warmup_batches}, {threshold}"
            )
        self.clock = clock
        self.window_batches = window_batches
        self.window_seconds = window_seconds
        self.threshold = threshold
        self.warmup_batches = warmup_batches
        self.min_step_seconds = min_step_seconds
        self.warned = False
        self._batches = self._samples = 0
        self._wait = self._step = 0.0
        self._window: deque[tuple[float, float]] = deque()
        self._window_wait = self._window_wall = 0.0
        self._epoch_batches = 0
        self._handed_out: float | None = None
        self._errors: list[int] = []

    def start_epoch(self) -> None:
        """A new iteration began: its first batches are warm-up, and no step precedes them."""
        self._epoch_batches = 0
        self._handed_out = None

    def record(self, asked: float, got: float, samples: int) -> bool:
        """Record one batch: ``asked``/``got`` are clock readings around ``next()``.

        Returns ``True`` exactly once: when the window first shows the loop input-bound.
        """
        wait = got - asked
        step = 0.0 if self._handed_out is None else max(asked - self._handed_out, 0.0)
        self._handed_out = got
        self._batches += 1
        self._samples += samples
        self._wait += wait
        self._step += step
        self._epoch_batches += 1
        if self._epoch_batches <= self.warmup_batches:
            return False
        self._window.append((wait, wait + step))
        self._window_wait += wait
        self._window_wall += wait + step
        while (
            len(self._window) > self.window_batches
            and self._window_wall - self._window[0][1] >= self.window_seconds
        ):
            old_wait, old_wall = self._window.popleft()
            self._window_wait -= old_wait
            self._window_wall -= old_wall
        if self.warned or not self._window_full():
            return False
        stepping = self._window_wall - self._window_wait >= self.min_step_seconds * len(
            self._window
        )
        if stepping and self._window_wait / self._window_wall > self.threshold:
            self.warned = True
            return True
        return False

    def _window_full(self) -> bool:
        return len(self._window) >= self.window_batches and self._window_wall >= self.window_seconds

    def record_errors(self, worker: int, count: int) -> None:
        """Count ``count`` replaced files for ``worker`` (0 for the main process)."""
        while len(self._errors) <= worker:
            self._errors.append(0)
        self._errors[worker] += count

    def stats(self, *, workers: int, decode_problems: tuple[Problem, ...] = ()) -> LoaderStats:
        """The totals so far as a ``LoaderStats``."""
        wall = self._wait + self._step
        window = None
        if self._window_full() and self._window_wall > 0:
            window = self._window_wait / self._window_wall
        errors = list(self._errors) + [0] * (max(workers, 1) - len(self._errors))
        return LoaderStats(
            batches=self._batches,
            samples=self._samples,
            wait_seconds=self._wait,
            step_seconds=self._step,
            wall_seconds=wall,
            wait_fraction=self._wait / wall if wall > 0 else 0.0,
            window_wait_fraction=window,
            batches_per_second=self._batches / wall if wall > 0 else 0.0,
            samples_per_second=self._samples / wall if wall > 0 else 0.0,
            consumer_batches_per_second=self._consumer_rate(),
            workers=workers,
            errors_by_worker=tuple(errors),
            decode_problems=decode_problems,
            warned=self.warned,
        )

    def _consumer_rate(self) -> float | None:
        steps = self._batches - 1
        if steps < 1 or self._step <= 0:
            return None
        return steps / self._step


def input_bound_advice(
    *,
    workers: int,
    max_workers: int,
    budget: str,
    measured: bool,
    output: str | None,
    fast_decode: bool | None,
) -> list[str]:
    """Concrete next steps, most effective first, for a loader that keeps the loop waiting.

    Args:
        workers: the loader's workers; ``max_workers``: the most the CPU budget runs.
        budget: the budget in words; ``measured``: whether ``workers="auto"`` chose the count.
        output, fast_decode: the dataset's settings (``None`` when it is not a stoker dataset).
    """
    advice = []
    if measured and workers < max_workers:
        advice.append(
            f"workers='auto' measured {workers} worker{'' if workers == 1 else 's'} as fast as "
            f"more on this budget ({budget}), so more workers will not help; the steps below may"
        )
    elif workers < max_workers:
        advice.append(
            f"more workers (workers={max_workers}, or workers='auto' with consumer_rate= the "
            f"training step's batches/s); this loader uses {workers} of a budget of "
            f"{max_workers} ({budget})"
        )
    else:
        advice.append(f"the loader already uses the whole CPU budget ({budget})")
    if output == "float":
        advice.append(
            "load_dataset(..., output='uint8') and stoker.to_float_images on the GPU "
            "(a quarter of the bytes through the worker queue)"
        )
    if fast_decode is False:
        advice.append("load_dataset(..., fast_decode=True) (JPEGs decoded at reduced scale)")
    advice.append(
        "caching latents (sd-scripts --cache_latents_to_disk), so images are not decoded and "
        "encoded every step"
    )
    return advice


def batch_samples(batch: object) -> int:
    """How many samples a collated batch holds (1 where it cannot be told)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        return 1
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return int(first.shape[0])
        return len(batch)
    return 1


def input_bound_message(stats: LoaderStats, window: InputMonitor, advice: list[str]) -> str:
    """The one warning: how much the loop waited, and what to do about it."""
    fraction = stats.window_wait_fraction or stats.wait_fraction
    return (
        f"training waited for data {fraction:.0%} of the time over the last "
        f"{len(window._window)} batches (more than {window.threshold:.0%}): the loader "
        f"delivers {stats.batches_per_second:.1f} batches/s"
        + (
            f" and the training step alone could take {stats.consumer_batches_per_second:.1f}/s"
            if stats.consumer_batches_per_second
            else ""
        )
        + ". Try: "
        + "; ".join(advice)
        + ". loader.stats() has the figures."
    )
