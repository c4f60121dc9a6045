"""Tuning ``workers="auto"``: measure candidate settings on the real dataset, choose, remember.

Layout: ``rules`` (pure: candidates and the choice), ``probe`` (timing candidate loaders built
by an injected factory, through an injected clock), ``remember`` (the JSON cache), ``run``
(``tune``, the entry point). ``stoker.tune_loader`` (``stoker.loader.make``) is ``tune`` with
loaders built by ``build_loader``; this package never imports the loader.

``tune_loader(dataset)`` is what ``workers="auto"`` (and ``prefetch_factor="auto"``) runs. It
measures through an injected clock and loader factory, so the rules below are tested with fake
ones; the planner receives the result as data (a ``MeasuredChoice``) and puts the choice, the
measurements and the reason in ``plan.defaults``.

**Candidates.** Worker counts within the CPU budget: every count up to 4, then steps of about 1.5x
(6, 9, 13, 19, 28, ...), plus the budget minus one and the budget itself. A 1-CPU budget has
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

from stoker.system.memory import MEMORY_HEADROOM, MemoryBudget, memory_budget
from stoker.tune.probe import Clock, LoaderFactory, Progress
from stoker.tune.remember import cache_dir
from stoker.tune.rules import (
    CONSUMER_MARGIN,
    WITHIN_BEST,
    ZERO_WORKERS_FACTOR,
    candidate_workers,
    choose,
    keeps_up,
)
from stoker.tune.run import TuneResult, tune

__all__ = [
    "CONSUMER_MARGIN",
    "MEMORY_HEADROOM",
    "WITHIN_BEST",
    "ZERO_WORKERS_FACTOR",
    "Clock",
    "LoaderFactory",
    "MemoryBudget",
    "Progress",
    "TuneResult",
    "cache_dir",
    "candidate_workers",
    "choose",
    "keeps_up",
    "memory_budget",
    "tune",
]
