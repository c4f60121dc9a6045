"""Pure rules for tuning the worker count live: measurements in, a decision with its reason out.

No clock, no processes, no files: ``decide`` looks at what was measured for each worker count on
the running loader and says whether to keep measuring, switch to another count, or settle.
``LiveTuner`` (``stoker.autotune.live``) feeds it; the rules are documented in
``stoker.autotune`` and tested with made-up tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_EVIDENCE",
    "KEEP_UP_WAIT",
    "MIN_BATCHES",
    "MIN_ROUNDS",
    "MIN_SECONDS",
    "REOPEN_WAIT",
    "SAME_RATE",
    "CONFIRM_WINDOWS",
    "CONTENDER",
    "FEWER_CEILING",
    "SPARE_CPU",
    "Decision",
    "Evidence",
    "Switch",
    "Window",
    "decide",
    "missing_evidence",
    "needed_batches",
    "neighbours",
]

# A count keeps up when the training loop waited at most this share of its time: a twentieth of
# the monitor's threshold (0.2), so the count that is chosen has room before it starts to show.
KEEP_UP_WAIT = 0.05
# Once settled, a window that waited more than the monitor's threshold (or, settled on the best
# throughput, one that now keeps up) means the consumer changed: measure again.
REOPEN_WAIT = 0.20
# Loader-bound: the fewest workers within 3% of the best measured rate. Rates of one count
# measured twice on a shared 2-CPU machine differed by up to 3% (docs/tuning.md).
SAME_RATE = 0.97
# Loader-bound: counts within 15% of the best are contenders, and each is measured in at least
# CONFIRM_WINDOWS windows at different times before the choice settles. On a shared 2-CPU machine
# one 12-batch window came out 13% above its count's 10-epoch rate (docs/tuning.md).
CONTENDER = 0.85
CONFIRM_WINDOWS = 2
# Loader-bound: a count below the pick is not measured when its processes could not use more
# than this share of the CPU the pick's workers used (one process per worker, or the main
# process alone at 0 workers; a process uses at most what one of the pick's workers used on
# average, and at least one CPU). Below CONTENDER, so that a count whose batches cost up to 12% less CPU
# (less contention with fewer processes) would still fall short of the pick by more than 3%.
FEWER_CEILING = CONTENDER
# Loader-bound: one worker more than the CPU budget is measured only when the best count's
# workers and the main process together left at least this much of the budget idle (the main
# process's share counts since session 4: it converts batches and runs the training loop on the
# same CPUs). Batches that cost unevenly return in
# order, so a worker may wait on its neighbour's costly batch; one more worker fills that wait
# (issue #13: on 2 CPUs, 3 workers beat 2 by 8% where the 2 used 1.6 CPUs). With no CPU left it
# would only add a process and its RAM. Not measured at all while batches that arrive early ask
# for the next (`stoker.torch_internals.dispatch_by_work`, session 4): that fills the same wait,
# and quiet sweeps then put 3 workers within 0.2-2.9% of 2 on 2 CPUs (docs/tuning.md), under
# SAME_RATE, so the count above the CPUs could never be the pick and only cost its window. With
# a training step that takes batches at a steady pace, 3 workers on 2 CPUs had waited 2-6% less
# than 2 only for their deeper queue (6 batches against 4); the loader now keeps 8 in flight
# whatever the count (`stoker.torch_internals.IN_FLIGHT`, session 6).
SPARE_CPU = 0.25
MIN_BATCHES = 12
MIN_ROUNDS = 3
MIN_SECONDS = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """How much a window must hold before it decides anything.

    Attributes:
        min_batches: batches timed (after the warm-up of a worker start).
        min_rounds: whole rounds of one batch per worker (workers started together finish
            together, so part of a round is a burst, not a rate).
        min_seconds: wall time covered.
    """

    min_batches: int = MIN_BATCHES
    min_rounds: int = MIN_ROUNDS
    min_seconds: float = MIN_SECONDS


DEFAULT_EVIDENCE = Evidence()


@dataclass(frozen=True, slots=True, kw_only=True)
class Window:
    """What the running loader delivered with one worker count.

    Attributes:
        workers: the worker count measured.
        batches: batches timed.
        samples: samples in them: the rates compared are samples per second. (Not source pixels:
            at resolution 1024 a sample cost 0.33 s plus 0.02 s per source megapixel, so pixels
            made a window of large images look fast; docs/tuning.md.)
        windows: how many windows were merged into this one (measurements at different times).
        wait_seconds: time the training loop spent blocked on these batches.
        step_seconds: time the training loop spent on its own work between them.
        cpu_seconds: CPU time the count's worker processes used over ``cpu_wall`` seconds of the
            window (``None``: not read; 0 workers, or no ``/proc``).
        cpu_wall: the window's seconds the CPU reading covers.
        main_cpu_seconds: CPU time the main process (the training loop, and what the loader does
            in it) used over the same ``cpu_wall`` seconds (``None``: not read).
    """

    workers: int
    batches: int = 0
    samples: int = 0
    windows: int = 1
    wait_seconds: float = 0.0
    step_seconds: float = 0.0
    cpu_seconds: float | None = None
    cpu_wall: float = 0.0
    main_cpu_seconds: float | None = None

    @property
    def cpus(self) -> float | None:
        """CPUs the workers used on average over the window (``None`` when not read)."""
        if self.cpu_seconds is None or self.cpu_wall <= 0:
            return None
        return self.cpu_seconds / self.cpu_wall

    @property
    def main_cpus(self) -> float | None:
        """CPUs the main process used on average over the window (``None`` when not read)."""
        if self.main_cpu_seconds is None or self.cpu_wall <= 0:
            return None
        return self.main_cpu_seconds / self.cpu_wall

    @property
    def seconds(self) -> float:
        """Wall time: wait plus step."""
        return self.wait_seconds + self.step_seconds

    @property
    def batches_per_second(self) -> float:
        """What the training loop received (0.0 before any time passed)."""
        return self.batches / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        """The rate compared between counts (see ``samples``)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        """Share of the wall time the training loop waited (1.0 before any time passed)."""
        return self.wait_seconds / self.seconds if self.seconds > 0 else 1.0

    @property
    def keeps_up(self) -> bool:
        """Whether the training loop waited at most ``KEEP_UP_WAIT`` of its time."""
        return self.batches > 0 and self.wait_fraction <= KEEP_UP_WAIT

    def add(self, other: Window) -> Window:
        """This window extended by ``other``'s batches (same count, one window)."""
        both = self.cpu_seconds is not None and other.cpu_seconds is not None
        cpu = (self.cpu_seconds or 0.0) + (other.cpu_seconds or 0.0) if both else None
        keep = self if self.cpu_seconds is not None else other
        mains = both and self.main_cpu_seconds is not None and other.main_cpu_seconds is not None
        return replace(
            self,
            batches=self.batches + other.batches,
            samples=self.samples + other.samples,
            wait_seconds=self.wait_seconds + other.wait_seconds,
            step_seconds=self.step_seconds + other.step_seconds,
            cpu_seconds=cpu if both else keep.cpu_seconds,
            cpu_wall=self.cpu_wall + other.cpu_wall if both else keep.cpu_wall,
            main_cpu_seconds=(
                (self.main_cpu_seconds or 0.0) + (other.main_cpu_seconds or 0.0)
                if mains
                else None
                if both
                else keep.main_cpu_seconds
            ),
        )

    def merge(self, other: Window) -> Window:
        """This window and a later one of the same count: ``windows`` counts both."""
        return replace(self.add(other), windows=self.windows + other.windows)

    def describe(self) -> str:
        """``2 workers 41 batches/s, waited 97% (24 batches)``, and, when read, the CPUs its
        workers used: ``(24 batches, the workers used 1.9 CPUs)``."""
        cpus, main = self.cpus, self.main_cpus
        used = "" if cpus is None else f", the workers used {cpus:.2g} CPUs"
        if used and main is not None:
            used += f", the main process {main:.2g}"
        return (
            f"{_workers(self.workers)} {self.batches_per_second:.3g} batches/s, waited "
            f"{self.wait_fraction:.0%} ({self.batches} batches{used})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What to do next, and why.

    Attributes:
        workers: the count to run from now on (the current one unless ``switch``).
        switch: change to ``workers`` now.
        settled: the comparison is made; keep ``workers`` unless the consumer changes.
        reason: one sentence naming every count measured and the rule applied.
        measured: the windows behind it, fewest workers first.
    """

    workers: int
    switch: bool
    settled: bool
    reason: str
    measured: tuple[Window, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Switch:
    """One change of the worker count while training ran.

    Attributes:
        batch: batches handed to the training loop before the switch (all epochs).
        epoch: the epoch it happened in.
        batch_in_epoch: the batches of that epoch already handed out (0: at the epoch's start).
        seconds: time since the loader's first batch was asked for (wait plus step).
        from_workers, to_workers: the counts.
        reason: the decision's reason.
    """

    batch: int
    epoch: int
    batch_in_epoch: int
    seconds: float
    from_workers: int
    to_workers: int
    reason: str


def needed_batches(workers: int, evidence: Evidence = DEFAULT_EVIDENCE) -> int:
    """The fewest batches a window of ``workers`` decides anything with."""
    return max(evidence.min_batches, evidence.min_rounds * max(workers, 1))


def missing_evidence(window: Window, evidence: Evidence = DEFAULT_EVIDENCE) -> str | None:
    """What ``window`` still lacks before it can decide, in words; ``None`` when it is enough."""
    round_size = max(window.workers, 1)
    need = needed_batches(window.workers, evidence)
    lacking = []
    if window.batches < need:
        lacking.append(f"{window.batches} of {need} batches")
    if window.seconds < evidence.min_seconds:
        lacking.append(f"{window.seconds:.2g} of {evidence.min_seconds:g} s")
    if not lacking and window.batches % round_size:
        lacking.append(f"a whole round of {round_size} batches")
    if not lacking:
        return None
    return f"too little evidence at {_workers(window.workers)} so far ({', '.join(lacking)})"


def neighbours(candidates: Sequence[int], workers: int) -> tuple[int | None, int | None]:
    """The candidate counts just below and just above ``workers`` (``None`` where there is none)."""
    below = [c for c in candidates if c < workers]
    above = [c for c in candidates if c > workers]
    return (max(below) if below else None, min(above) if above else None)


def decide(
    windows: Mapping[int, Window],
    current: int,
    candidates: Sequence[int],
    *,
    evidence: Evidence = DEFAULT_EVIDENCE,
    cpu_budget: int | None = None,
    asks_ahead: bool = False,
) -> Decision:
    """The next step of the search, from the windows measured so far (one per count).

    Rules (the ``stoker.autotune`` docstring tells them in full):

    1. The current count's window lacks evidence: stay and keep measuring (the reason says so).
    2. Some measured count keeps up with the training loop: take the fewest that does, after
       measuring the candidate just below it (unless that is already measured or none exists).
    3. None keeps up (the loader is the bottleneck): take the best rate, after measuring its
       candidates just above and below; of counts within ``SAME_RATE`` of the best, the fewest.
       Fewer workers whose processes could not use enough CPU to come within
       ``FEWER_CEILING`` of the pick's rate (from the CPU its workers used) are not measured,
       and the reason lists them as not measured. A count above ``cpu_budget`` is measured
       only when the best count's workers and the main process left ``SPARE_CPU`` of the
       budget idle, and never while early batches ask for the next (``asks_ahead``).

    Only counts in ``windows`` are compared, and the reason names each with its figures.

    Args:
        windows: per worker count, everything measured with it.
        current: the count running now.
        candidates: the counts allowed (CPU and memory budget), any order.
        evidence: how much a window must hold.
        cpu_budget: the CPUs of the budget (``None``: every candidate is within it).
        asks_ahead: the loader's batches that arrive before their turn ask for the next
            (``stoker.torch_internals.dispatch_by_work``): no count above ``cpu_budget`` is
            measured (``SPARE_CPU``).

    Raises:
        ValueError: ``current`` is not a candidate.
    """
    allowed = sorted(set(candidates))
    if current not in allowed:
        raise ValueError(f"the current count {current} is not among the candidates {allowed}")
    measured = {k: w for k, w in windows.items() if k in allowed and w.batches > 0}
    table = tuple(measured[k] for k in sorted(measured))
    lacking = missing_evidence(measured.get(current, Window(workers=current)), evidence)
    if lacking is not None:
        return Decision(
            workers=current,
            switch=False,
            settled=False,
            reason=lacking + "; measuring",
            measured=table,
        )
    solid = {k: w for k, w in measured.items() if missing_evidence(w, evidence) is None}
    keepers = sorted(k for k, w in solid.items() if w.keeps_up)
    if keepers:
        decision = _fewest_that_keep_up(solid, keepers[0], allowed, table)
    else:
        decision = _best_rate(solid, allowed, table, current, cpu_budget, asks_ahead)
    # Settling on a count other than the one running is a switch too.
    return replace(decision, switch=decision.workers != current)


def _fewest_that_keep_up(
    solid: Mapping[int, Window], fewest: int, allowed: Sequence[int], table: tuple[Window, ...]
) -> Decision:
    below, _ = neighbours(allowed, fewest)
    summary = _summary(table)
    if below is not None and below not in solid:
        return Decision(
            workers=below,
            switch=True,
            settled=False,
            reason=f"measured {summary}: {_workers(fewest)} keep up with the training loop "
            f"(waited at most {KEEP_UP_WAIT:.0%}); trying {below}, fewer may too",
            measured=table,
        )
    why = (
        f"measured {summary}: {_workers(fewest)} is the fewest that keeps up with the training "
        f"loop (waited at most {KEEP_UP_WAIT:.0%})"
    )
    if below is not None:
        why += f"; {_workers(below)} did not"
    return Decision(workers=fewest, switch=False, settled=True, reason=why, measured=table)


def _best_rate(
    solid: Mapping[int, Window],
    allowed: Sequence[int],
    table: tuple[Window, ...],
    current: int,
    cpu_budget: int | None,
    asks_ahead: bool,
) -> Decision:
    best = max(solid, key=lambda k: solid[k].samples_per_second)
    top = solid[best].samples_per_second
    pick = min(k for k, w in solid.items() if w.samples_per_second >= SAME_RATE * top)
    summary = _summary(table)
    ruled_out, ceiling = _cannot_deliver_more(solid[pick], allowed, {w.workers for w in table})
    above = _no_spare_cpu(solid[best], allowed, set(solid), cpu_budget, asks_ahead)
    for edge, side in (
        (neighbours(allowed, best)[1], "more"),
        (neighbours(allowed, pick)[0], "fewer"),
    ):
        if edge is not None and edge not in solid and edge not in ruled_out + above:
            if (
                side == "more"
                and cpu_budget is not None
                and edge > cpu_budget
                and best == current
                and solid[best].windows < CONFIRM_WINDOWS
            ):
                # Both would be measured twice before settling (CONTENDER); the count running
                # first, so that leaving it costs one switch, not a second one back and forth.
                return Decision(
                    workers=best,
                    switch=False,
                    settled=False,
                    reason=f"measured {summary}: the training loop waits for data and the "
                    f"workers left CPU idle; measuring {best} again before trying {edge}, more "
                    f"than the {cpu_budget} CPUs",
                    measured=table,
                )
            mine = solid[pick]
            if (
                side == "fewer"
                and pick == current
                and mine.cpus is not None
                and mine.windows < CONFIRM_WINDOWS
            ):
                # One window's CPU reading did not rule fewer out; a second window of the count
                # running costs no switch and reads over other batches.
                return Decision(
                    workers=pick,
                    switch=False,
                    settled=False,
                    reason=f"measured {summary}: the training loop waits for data; the CPU its "
                    f"workers used does not yet rule out fewer; measuring {pick} again before "
                    f"trying fewer",
                    measured=table,
                )
            return Decision(
                workers=edge,
                switch=True,
                settled=False,
                reason=f"measured {summary}: the training loop waits for data, "
                f"{_workers(best)} is the fastest so far; trying {edge} ({side})",
                measured=table,
            )
    contenders = [k for k, w in solid.items() if w.samples_per_second >= CONTENDER * top]
    unconfirmed = [k for k in contenders if solid[k].windows < CONFIRM_WINDOWS]
    if unconfirmed:
        # the pick first: it is where the loader goes next anyway
        again = pick if pick in unconfirmed else unconfirmed[0]
        return Decision(
            workers=again,
            switch=True,
            settled=False,
            reason=f"measured {summary}: counts within {1 - CONTENDER:.0%} of the best are "
            f"measured twice before the choice settles; measuring {again} again",
            measured=table,
        )
    why = f"measured {summary}: the training loop waits for data with every count measured; "
    if pick == best:
        why += f"{_workers(best)} delivers the most"
    else:
        why += (
            f"{_workers(pick)} is the fewest within {1 - SAME_RATE:.0%} of the best "
            f"({_workers(best)})"
        )
    if ruled_out:
        used = solid[pick].cpus or 0.0
        why += (
            f"; not measured: {', '.join(_workers(k) for k in ruled_out)}, since fewer processes "
            f"cannot use more CPU: the {pick} worker processes used {used:.2g} CPUs, and the "
            f"{max(ruled_out[0], 1)} process of {_workers(ruled_out[0])} could deliver at most "
            f"{ceiling:.2f}x their rate"
        )
    if above:
        best_cpus, main_cpus = solid[best].cpus, solid[best].main_cpus
        main = "" if main_cpus is None else f" and the main process {main_cpus:.2g}"
        if asks_ahead:
            since = (
                "batches that arrive before their turn already ask for the next, which fills "
                "the wait one worker more would"
            )
        elif best_cpus is None or best == 0:
            since = f"the CPU {_workers(best)} used was not read"
        else:
            since = (
                f"{_workers(best)} used {best_cpus:.2g} CPUs{main}, under {SPARE_CPU:g} left idle"
            )
        why += (
            f"; not measured: {', '.join(_workers(k) for k in above)}, more than the "
            f"{cpu_budget} CPUs, since {since}"
        )
    return Decision(workers=pick, switch=False, settled=True, reason=why, measured=table)


def _no_spare_cpu(
    window: Window,
    allowed: Sequence[int],
    measured: Set[int],
    cpu_budget: int | None,
    asks_ahead: bool,
) -> tuple[int, ...]:
    """The unmeasured counts above ``cpu_budget`` not worth measuring: all of them when early
    batches ask for the next (``asks_ahead``) or unless ``window``'s workers (the best count's)
    and the main process left at least ``SPARE_CPU`` of the budget idle."""
    if cpu_budget is None:
        return ()
    over = tuple(k for k in allowed if k > cpu_budget and k not in measured)
    if asks_ahead:
        return over
    cpus = window.cpus
    if cpus is not None and window.workers > 0:
        cpus += window.main_cpus or 0.0
        if cpus <= cpu_budget - SPARE_CPU:
            return ()
    return over


def _cannot_deliver_more(
    window: Window, allowed: Sequence[int], measured: Set[int]
) -> tuple[tuple[int, ...], float]:
    """The unmeasured counts below ``window``'s that could not use enough CPU to come within
    ``FEWER_CEILING`` of its rate, most first, and the highest of their ceilings.

    The loader is the bottleneck and ``window.workers`` worker processes used ``window.cpus``
    CPUs. ``k`` workers are ``k`` processes (0 workers: the main process alone), each using at
    most what one of these did on average, and at least one CPU; with the same CPU per batch they
    reach at most ``max(k, 1) * per_process / cpus`` of the rate. Nothing is ruled out without a
    CPU reading.
    """
    cpus = window.cpus
    if cpus is None or cpus <= 0 or window.workers < 1:
        return (), 0.0
    per_process = max(1.0, cpus / window.workers)
    out: list[int] = []
    top = 0.0
    for k in sorted((c for c in allowed if c < window.workers), reverse=True):
        ceiling = max(k, 1) * per_process / cpus
        if k in measured:
            continue
        if ceiling > FEWER_CEILING:
            break
        out.append(k)
        top = max(top, ceiling)
    return tuple(out), top


def _summary(table: Sequence[Window]) -> str:
    return "; ".join(w.describe() for w in table) if table else "nothing"


def _workers(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"
