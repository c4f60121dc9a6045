"""Tune the worker count on the training run itself, while it trains (``workers="auto"``).

stoker's batches do not depend on the worker count (every random choice is keyed on seed, epoch
and position) and the loader resumes exactly with another count, so the count can change between
two batches without changing a single batch. The loader times each batch (the **wait**: the
training loop blocked in ``next()``; the **step**: the loop's own work until it asks again; the
same two figures the input-bound monitor uses), and ``LiveTuner`` groups them into a window per
worker count. There is no separate probe pass and no batch is thrown away: every batch timed is a
batch trained on.

**A window** starts after the first round of batches of a worker start (one batch per worker: it
pays for the start and arrives as a burst) and closes after at least ``MIN_BATCHES`` batches,
``MIN_ROUNDS`` whole rounds and ``MIN_SECONDS`` of wall time. Rates are compared in samples per
second. A decision on less says so ("too little evidence at 2 workers so far (5 of 12 batches)")
and keeps measuring.

**The rules** (``rules.decide``), over the counts measured so far on this run:

- **The training loop keeps up** with a count when it waited at most ``KEEP_UP_WAIT`` (5%) of its
  time: the consumer is the bottleneck. Take the fewest workers that keep up, since each worker
  costs RAM and start-up, after measuring the count just below it: the reason then reads
  "1 worker is the fewest that keeps up ...; 0 workers did not".
- **The loader is the bottleneck** when no measured count keeps up. Take the best rate, after
  measuring the counts just above and below it; of counts within ``SAME_RATE`` (3%) of the best,
  the fewest. Before it settles, every count within ``CONTENDER`` (15%) of the best is measured
  in ``CONFIRM_WINDOWS`` (2) windows at different times, merged: on a shared machine one short
  window can be off by more than the difference between two counts.
- **Fewer workers that cannot use more CPU are not measured.** The tuner reads the CPU time the
  workers used over each window (``/proc/<pid>/stat``; nothing where that cannot be read). When
  the loader is the bottleneck at the pick and ``k`` fewer workers, as processes (one each; the
  main process alone at 0 workers) using at most what one of the pick's workers did and at least
  a CPU, could reach at most ``FEWER_CEILING`` (85%) of its rate with the same CPU per batch,
  they are not measured: on 2 CPUs, 2 workers that used 1.9 CPUs leave 1 worker at most 0.53x.
  A reading that does not rule them out is first read again over the running count's second
  window (no switch).
  The reason says "not measured: 1 worker, 0 workers, since fewer processes cannot use more
  CPU ...". A short run (40 images, 10 epochs, 7.5 s) otherwise paid 8% of its time for the
  1-worker window and two switches (issue 13).
- **One worker above the CPUs** (``SPARE_CPU``) is measured only when the loader is the
  bottleneck and the best count's workers and the main process together left at least a quarter
  of a CPU of the budget idle (the main process's CPU time, ``time.process_time``, is read over
  the same windows: it converts batches and runs the training loop on the same CPUs); otherwise
  the reason says "not measured: 3 workers, more than the 2 CPUs, since 2 workers used 1.8 CPUs
  and the main process 0.2, under 0.25 left idle". Never while the loader's batches that arrive
  before their turn ask for the next (``StokerLoader.asks_ahead``, the default where ``/dev/shm``
  has room): that fills the same wait, and quiet sweeps put 3 workers within 0.2-2.9% of 2 on
  2 CPUs (under ``SAME_RATE``, so it could never be the pick); the reason says so. With a
  steadily paced training step the loader keeps the same batches in flight at every count
  (``stoker.torch_internals.IN_FLIGHT``), so one worker more no longer wins by its deeper queue.
- Counts never measured are never compared: each reason lists exactly the counts measured, with
  batches/s, the wait and the number of batches.

**Settled** once the comparison is made. The count then stays; its windows are still watched, and
only when the training loop clearly changed (a count chosen to keep up now waits more than
``REOPEN_WAIT``, the monitor's 20%, or a loader-bound count now keeps up) is the search run again,
at most ``MAX_REOPENINGS`` times.

**Where it starts.** Candidates are ``stoker.tune.candidate_workers(budget)`` (0 .. the CPU
budget; 1-CPU budgets have nothing to compare). The start is the choice remembered from an earlier
run on the same dataset, budget and versions (cached like ``stoker tune``'s), which is then
checked live: when its first window agrees with what was remembered, it settles at once.
Without one it starts from the most workers the budget runs, at most 8: on 2 CPUs with a consumer
that does nothing, the budget minus one (1 worker) was the worst count measured (issue 13), and a
slow consumer only costs the switches down.
"""

from __future__ import annotations

from stoker.autotune.live import MAX_REOPENINGS, LiveTuner, Remembered
from stoker.autotune.rules import (
    CONFIRM_WINDOWS,
    CONTENDER,
    FEWER_CEILING,
    KEEP_UP_WAIT,
    REOPEN_WAIT,
    SAME_RATE,
    Decision,
    Evidence,
    Switch,
    Window,
    decide,
)

__all__ = [
    "CONFIRM_WINDOWS",
    "CONTENDER",
    "FEWER_CEILING",
    "KEEP_UP_WAIT",
    "MAX_REOPENINGS",
    "REOPEN_WAIT",
    "SAME_RATE",
    "Decision",
    "Evidence",
    "LiveTuner",
    "Remembered",
    "Switch",
    "Window",
    "decide",
]
