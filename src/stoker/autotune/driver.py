"""Run the live tuner on a loader: time its batches, switch the worker count exactly, remember.

``LiveTuning`` is what a ``StokerLoader`` made with ``workers="auto"`` (or no worker count) holds.
The loader hands it the clock readings around each ``next()`` (the same ones the input-bound
monitor records); when a decision says switch, the loader stops asking its workers for more
batches and calls ``switch`` at once, which gives the loader the new count and continues the
sampler from the first batch the old workers were not asked for (the batches consumed plus the
ones outstanding): the exact resume the loader already has, so no batch is lost, repeated or
thrown away. The new workers start and load while the old ones hand over what they were asked
for, so the loop does not wait for the new workers' start. When nothing is left to ask for in the
epoch (or this torch cannot tell what is outstanding), the switch waits for the hand-over to end:
at the next epoch's start, or mid-epoch at the first batch not handed out. Rules:
``stoker.autotune``.

Nothing here imports the loader: the planner is passed in as ``plan_for``, and the cache and the
memory reading as callables, so the arrows stay ``plan -> autotune -> loader``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from stoker.autotune.live import LiveTuner
from stoker.autotune.rules import Decision, Switch, Window
from stoker.monitor import batch_samples
from stoker.plan import Adjustment, LoaderPlan, LoaderRequest, Measurement
from stoker.torch_internals import set_worker_settings

__all__ = ["LiveTuning", "live_plan", "measurements_of"]

logger = logging.getLogger("stoker")

PlanFor = Callable[[LoaderRequest], LoaderPlan]
"""Plans a request on the loader's budget without warning (``stoker.loader.plan_request``)."""
MemoryCap = Callable[[Any], tuple[int, str] | None]
"""``cap(loader)``: the most workers the memory allows and why, read from the running workers."""
Remember = Callable[[Decision, bool], None]
"""``remember(decision, keeps_up)``: store a settled choice for the next run."""
CpuUse = Callable[[Any], float | None]
"""``cpu_use(loader)``: CPU seconds the loader's workers have used so far (a running total that
only grows; ``None`` where it cannot be read)."""


def live_plan(
    request: LoaderRequest, workers: int, decision: Decision, plan_for: PlanFor
) -> LoaderPlan:
    """The plan for ``workers`` under ``request`` (its other fields as asked), whose ``defaults``
    say the count was tuned live and why."""
    fixed = LoaderRequest(
        workers=workers,
        persistent=request.persistent,
        prefetch_factor=None if request.prefetch_factor == "auto" else request.prefetch_factor,
        pin_memory=request.pin_memory,
        timeout=request.timeout,
        start_method=request.start_method,
    )
    plan = plan_for(fixed)
    if 0 < plan.num_workers < workers:
        # The planner caps an asked-for count at the CPUs; the live tuner goes one above them
        # only on a measurement that the workers left CPU idle (rules.SPARE_CPU), so it stands.
        plan = replace(
            plan,
            num_workers=workers,
            adjustments=tuple(a for a in plan.adjustments if a.setting != "workers"),
        )
    note = Adjustment(
        setting="workers",
        requested=request.workers,
        chosen=workers,
        reason=f"tuned live on this run: {decision.reason}",
        measurements=measurements_of(decision, plan.prefetch_factor or 2),
    )
    others = tuple(a for a in plan.defaults if a.setting != "workers")
    return LoaderPlan(
        num_workers=plan.num_workers,
        persistent_workers=plan.persistent_workers,
        prefetch_factor=plan.prefetch_factor,
        pin_memory=plan.pin_memory,
        timeout=plan.timeout,
        multiprocessing_context=plan.multiprocessing_context,
        adjustments=plan.adjustments,
        defaults=(note, *others),
        budget=plan.budget,
        request=request,
    )


def measurements_of(decision: Decision, prefetch_factor: int) -> tuple[Measurement, ...]:
    """The decision's windows as the ``Measurement`` records plans and ``stoker tune`` show."""
    return tuple(_measurement(w, prefetch_factor) for w in decision.measured)


def _measurement(window: Window, prefetch_factor: int) -> Measurement:
    return Measurement(
        workers=window.workers,
        prefetch_factor=prefetch_factor if window.workers else None,
        batches_per_second=window.batches_per_second,
        samples_per_second=window.samples / window.seconds if window.seconds > 0 else 0.0,
        batches=window.batches,
        first_batch_seconds=0.0,
        note=f"live: the training loop waited {window.wait_fraction:.0%}"
        + ("" if window.cpus is None else f", the workers used {window.cpus:.2g} CPUs"),
    )


@dataclass(slots=True)
class _Clock:
    """Wait and step from the readings around ``next()``, and the run's total so far."""

    handed_out: float | None = None
    seconds: float = 0.0
    batches: int = 0

    def split(self, asked: float, got: float) -> tuple[float, float]:
        wait = max(got - asked, 0.0)
        step = 0.0 if self.handed_out is None else max(asked - self.handed_out, 0.0)
        self.handed_out = got
        self.seconds += wait + step
        self.batches += 1
        return wait, step


class LiveTuning:
    """A loader's live tuner and its switches (see the module docstring).

    Args:
        tuner: the rules' state.
        request: what the user asked for (its ``workers`` is ``"auto"`` or ``None``).
        plan_for: plans a fixed request on the loader's budget.
        remember: stores a settled choice (``None``: not cached).
        memory_cap: reads how many workers fit in memory (``None``: not checked).
        cache_path: the file ``remember`` writes (for reports).
        cpu_use: reads the workers' CPU time (``None``: not read, so no count is ruled out by it).
    """

    def __init__(
        self,
        *,
        tuner: LiveTuner,
        request: LoaderRequest,
        plan_for: PlanFor,
        remember: Remember | None = None,
        memory_cap: MemoryCap | None = None,
        cache_path: str | None = None,
        cpu_use: CpuUse | None = None,
    ) -> None:
        self.tuner = tuner
        self.request = request
        self.plan_for = plan_for
        self.remember = remember
        self.memory_cap = memory_cap
        self.cache_path = cache_path
        self.cpu_use = cpu_use
        self.switches: list[Switch] = []
        self.pending: Decision | None = None
        self.draining = False
        self._clock = _Clock()
        self._memory_checked: set[int] = set()

    @property
    def reason(self) -> str:
        """The latest decision's reason."""
        return self.tuner.decision.reason

    def start_epoch(self) -> None:
        """A new iteration began: no step precedes its first batch."""
        self._clock.handed_out = None

    def observe(self, loader: Any, asked: float, got: float, batch: object) -> None:
        """Time one batch handed out; on a switch decision, set ``pending`` (the loader then stops
        its iterator asking for more and hands over)."""
        wait, step = self._clock.split(asked, got)
        if self.draining or self.pending is not None:
            return  # batches asked for before the switch: the old count's, not timed
        if loader.num_workers > 0:  # 0 workers ask nothing ahead, yet say nothing of workers
            self.tuner.asks_ahead = bool(getattr(loader, "asks_ahead", False))
        cpu_use = self.cpu_use
        read = None if cpu_use is None or loader.num_workers == 0 else (lambda: cpu_use(loader))
        decision = self.tuner.observe(
            wait, step, batch_samples(batch), cpu=read, main_cpu=time.process_time
        )
        if decision is not None:
            decision = self._check_memory(loader) or decision
        if decision is None:
            return
        if decision.settled and self.remember is not None:
            self.remember(decision, self.tuner.windows[decision.workers].keeps_up)
        if decision.switch and decision.workers != loader.num_workers:
            self.pending = decision

    def _check_memory(self, loader: Any) -> Decision | None:
        count = self.tuner.current
        if self.memory_cap is None or count == 0 or count in self._memory_checked:
            return None
        self._memory_checked.add(count)
        found = self.memory_cap(loader)
        return None if found is None else self.tuner.limit(*found)

    def switch(
        self,
        loader: Any,
        *,
        epoch: int,
        batch_in_epoch: int,
        resume_at: int | None,
        keep_running: bool = False,
        handing_over: int = 0,
    ) -> Any:
        """Apply the pending decision to ``loader``.

        Args:
            loader: the ``StokerLoader``.
            epoch, batch_in_epoch: where the new count's batches begin, for the record.
            resume_at: mid-epoch: the batch of the epoch the sampler continues from (the first
                the old iterator did not ask for); ``None`` at an epoch's start.
            keep_running: the old iterator still hands out what it asked for: persistent workers
                are detached, not stopped.
            handing_over: batches the old iterator still hands out before the new count's first.

        Returns:
            The detached persistent iterator (``keep_running``), for the caller to drain and
            stop; else ``None``.
        """
        decision = self.pending
        self.pending, self.draining = None, False
        if resume_at is not None:
            # The old iterator asked for nothing after resume_at: the next one continues there.
            sampler = loader.resumable_sampler
            state = sampler.state_dict()
            state["batches_done"] = resume_at
            sampler.load_state_dict(state)
        if decision is None or decision.workers == loader.num_workers:
            return None
        plan = live_plan(self.request, decision.workers, decision, self.plan_for)
        before = loader.num_workers
        old = set_worker_settings(
            loader,
            num_workers=plan.num_workers,
            prefetch_factor=plan.prefetch_factor,
            persistent_workers=plan.persistent_workers,
            timeout=plan.timeout,
            multiprocessing_context=plan.multiprocessing_context,
            keep_running=keep_running,
        )
        loader.plan = plan
        # The new workers load while the old ones hand over: up to every batch they may have
        # asked for is ready when the hand-over ends, and would time as instant.
        # (Torch's depth: the new iterator is not read before the hand-over ends, so the top-up
        # to `in_flight`, made at a hand-out, has not happened yet.)
        burst = plan.num_workers * (plan.prefetch_factor or 1) if handing_over else None
        self.tuner.switched(plan.num_workers, burst)
        self.switches.append(
            Switch(
                batch=self._clock.batches + handing_over,
                epoch=epoch,
                batch_in_epoch=batch_in_epoch,
                seconds=self._clock.seconds,
                from_workers=before,
                to_workers=plan.num_workers,
                reason=decision.reason,
            )
        )
        logger.info(
            "stoker switched workers from %d to %d at batch %d: %s",
            before,
            plan.num_workers,
            self._clock.batches,
            decision.reason,
        )
        return old
