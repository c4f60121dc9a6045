"""The live tuner's state: batch timings in, decisions out; still no clock and no processes.

``LiveTuner.observe(wait, step, work)`` takes the timings of one batch (the same ones the
input-bound monitor records), groups them into windows per worker count, and returns a
``Decision`` from ``stoker.autotune.rules.decide`` whenever a window closes. The loader applies a
switch and calls ``switched``; everything else (the remembered start, re-checking a settled
choice, the memory cap) is here, so it is tested without workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from stoker.autotune.rules import (
    DEFAULT_EVIDENCE,
    REOPEN_WAIT,
    Decision,
    Evidence,
    Window,
    decide,
    missing_evidence,
    needed_batches,
)

__all__ = ["MAX_REOPENINGS", "LiveTuner", "Remembered"]

# A consumer that keeps changing speed must not keep the loader switching: after this many
# re-checks the choice stays, and the reason says so.
MAX_REOPENINGS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Remembered:
    """A choice settled by an earlier run on the same dataset, budget and versions.

    Attributes:
        workers: the count it settled on.
        keeps_up: whether that count kept up with the training loop then (else it was the best
            rate of a loader-bound run).
        reason: the earlier decision's reason.
    """

    workers: int
    keeps_up: bool
    reason: str


class LiveTuner:
    """Windows per worker count and the current decision (see the module docstring).

    Args:
        start: the count the loader starts with.
        candidates: the counts allowed by the CPU budget (with one above it, see
            ``cpu_budget``).
        evidence: how much a window must hold.
        remembered: an earlier run's choice; when ``start`` is its count and the first window
            agrees with it (keeps up, or not, as then), the tuner settles at once.
        cpu_budget: the budget's CPUs: candidates above it are measured only when the workers
            left CPU idle (`stoker.autotune.rules.SPARE_CPU`); ``None``: no such rule.
    """

    def __init__(
        self,
        *,
        start: int,
        candidates: Sequence[int],
        evidence: Evidence = DEFAULT_EVIDENCE,
        remembered: Remembered | None = None,
        cpu_budget: int | None = None,
    ) -> None:
        self.candidates = tuple(sorted(set(candidates) | {start}))
        self.cpu_budget = cpu_budget
        self.current = start
        self.evidence = evidence
        self.remembered = remembered
        self.windows: dict[int, Window] = {}
        self.decision = Decision(
            workers=start,
            switch=False,
            settled=False,
            reason=f"started with {start} workers; nothing measured yet",
        )
        self.reopenings = 0
        self._need = 0
        # Set by the loader: its early batches ask for the next (rules.decide's asks_ahead).
        self.asks_ahead = False
        self._open = _OpenWindow()
        self._skip = 0
        self._cpu_open: tuple[float | None, float, float | None] | None = None
        self.restarted()

    @property
    def settled(self) -> bool:
        """Whether the comparison is made and the count stays (unless the consumer changes)."""
        return self.decision.settled

    def restarted(self, burst: int | None = None) -> None:
        """Workers (re)started: the first ``burst`` batches (default: one round) arrive together
        after the start, not timed."""
        self._skip = max(self.current if burst is None else burst, 1)
        self._open = _OpenWindow()
        self._need = needed_batches(self.current, self.evidence)  # before a window may close
        self._cpu_open = None

    def switched(self, workers: int, burst: int | None = None) -> None:
        """The loader now runs ``workers``; measure it after the ``burst`` of batches they
        loaded while the old ones handed over theirs (default: one round)."""
        self.current = workers
        if self.decision.workers == workers:
            self.decision = replace(self.decision, switch=False)
        self.restarted(burst)

    def limit(self, max_workers: int, why: str) -> Decision | None:
        """Allow at most ``max_workers`` (the memory budget); a switch when the current is above."""
        allowed = tuple(c for c in self.candidates if c <= max_workers) or (0,)
        if allowed == self.candidates:
            return None
        self.candidates = allowed
        self.windows = {k: w for k, w in self.windows.items() if k in allowed}
        if self.current in allowed:
            return None
        self.decision = Decision(
            workers=allowed[-1],
            switch=True,
            settled=False,
            reason=f"{why}: at most {allowed[-1]} workers fit",
            measured=tuple(self.windows[k] for k in sorted(self.windows)),
        )
        return self.decision

    def observe(
        self,
        wait_seconds: float,
        step_seconds: float,
        samples: int = 1,
        *,
        cpu: Callable[[], float | None] | None = None,
        main_cpu: Callable[[], float] | None = None,
    ) -> Decision | None:
        """Record one batch of ``samples``; returns a new decision when a window closes, else
        ``None``.

        ``cpu`` reads the CPU seconds the running workers have used so far; it is called when a
        window's first batch is recorded and when the window closes, and the window keeps the
        difference (``Window.cpu_seconds``) over the seconds between the two calls. ``main_cpu``
        reads the main process's CPU seconds at the same two moments (``Window.main_cpu_seconds``;
        only with ``cpu``).
        """
        if self._skip > 0:
            self._skip -= 1
            return None
        # Plain sums per batch (this runs in the training loop's process for every batch); a
        # Window only when the window may close.
        open_ = self._open
        opening = open_.batches == 0
        open_.batches += 1
        open_.samples += samples
        open_.wait_seconds += max(wait_seconds, 0.0)
        open_.step_seconds += max(step_seconds, 0.0)
        seconds = open_.wait_seconds + open_.step_seconds
        if opening and cpu is not None:
            self._cpu_open = (cpu(), seconds, None if main_cpu is None else main_cpu())
        if open_.batches < self._need or seconds < self.evidence.min_seconds:
            return None
        closed = Window(
            workers=self.current,
            batches=open_.batches,
            samples=open_.samples,
            wait_seconds=open_.wait_seconds,
            step_seconds=open_.step_seconds,
        )
        if missing_evidence(closed, self.evidence) is not None:
            return None
        self._open = _OpenWindow()
        began, self._cpu_open = self._cpu_open, None
        if cpu is not None and began is not None and began[0] is not None:
            now, wall = cpu(), closed.seconds - began[1]
            if now is not None and now >= began[0] and wall > 0:
                main = None if main_cpu is None or began[2] is None else main_cpu() - began[2]
                closed = replace(
                    closed, cpu_seconds=now - began[0], cpu_wall=wall, main_cpu_seconds=main
                )
        return self._closed(closed)

    def _closed(self, window: Window) -> Decision | None:
        if self.settled:
            return self._recheck(window)
        first = not self.windows
        known = self.windows.get(self.current)
        self.windows[self.current] = window if known is None else known.merge(window)
        remembered = self.remembered
        if (
            first
            and remembered is not None
            and remembered.workers == self.current
            and window.keeps_up == remembered.keeps_up
        ):
            self.decision = Decision(
                workers=self.current,
                switch=False,
                settled=True,
                reason=f"remembered: {remembered.reason}; checked live: {window.describe()}",
                measured=(window,),
            )
            return self.decision
        self.decision = self._decide()
        if self.remembered is not None and first:
            self.decision = _note(self.decision, "the remembered choice did not hold live")
        return self.decision

    def _decide(self) -> Decision:
        return decide(
            self.windows,
            self.current,
            self.candidates,
            evidence=self.evidence,
            cpu_budget=self.cpu_budget,
            asks_ahead=self.asks_ahead,
        )

    def _recheck(self, window: Window) -> Decision | None:
        """Settled: measure again only when the training loop's demand clearly changed (a new
        decision then; ``None`` while nothing changed)."""
        kept_up = self.windows.get(self.current, window).keeps_up
        changed = (kept_up and window.wait_fraction > REOPEN_WAIT) or (
            not kept_up and window.keeps_up
        )
        if not changed:
            return None
        if self.reopenings >= MAX_REOPENINGS:
            if "the choice stays" in self.decision.reason:
                return None
            self.decision = _note(
                self.decision,
                f"the training loop changed again ({window.describe()}), but after "
                f"{MAX_REOPENINGS} re-checks the choice stays",
            )
            return self.decision
        self.reopenings += 1
        self.windows = {self.current: window}
        self.decision = _note(
            self._decide(),
            f"re-check {self.reopenings}: the training loop changed ({window.describe()})",
        )
        return self.decision


@dataclass(slots=True)
class _OpenWindow:
    """The sums of the window being measured (`LiveTuner.observe`)."""

    batches: int = 0
    samples: int = 0
    wait_seconds: float = 0.0
    step_seconds: float = 0.0


def _note(decision: Decision, note: str) -> Decision:
    return replace(decision, reason=f"{decision.reason} ({note})")
