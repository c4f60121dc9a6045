"""Where live tuning meets the machine: the start count, the remembered choice, worker memory.

``start_live`` is the one call ``make_loader`` makes: it reads the remembered choice (the cache
``stoker tune`` and ``workers="auto"`` share, ``stoker.tune.remember``), picks the start count
and builds the ``LiveTuning`` the loader holds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.autotune.driver import LiveTuning, PlanFor, live_plan
from stoker.autotune.live import LiveTuner, Remembered
from stoker.autotune.rules import Decision
from stoker.data.protocol import BatchingDataset
from stoker.plan import DEFAULT_MAX_WORKERS, LoaderPlan, LoaderRequest, MeasuredChoice
from stoker.system.cpu import Budget, process_cpu_seconds
from stoker.system.memory import memory_budget, worker_uss_bytes
from stoker.tune import remember as cache
from stoker.tune.rules import candidate_workers

__all__ = ["LiveStart", "WorkerCpu", "start_live", "tunes_live"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveStart:
    """What ``make_loader`` builds a live-tuned loader from.

    Attributes:
        plan: the plan of the start count (its ``defaults`` say why that count).
        tuning: the tuner to attach as the loader's ``_tuning``.
    """

    plan: LoaderPlan
    tuning: LiveTuning


def tunes_live(
    request: LoaderRequest, dataset: Any, budget: Budget, extra: Mapping[str, Any]
) -> bool:
    """Whether ``make_loader`` tunes workers live: no worker count given (or ``"auto"``), a
    ``load_dataset`` dataset (its sampler resumes exactly), its own sampler, and more than one CPU
    (on one, the planner's rule has nothing to compare)."""
    return (
        request.workers in (None, "auto")
        and request.prefetch_factor != "auto"
        and callable(getattr(dataset, "make_batch_sampler", None))
        and "batch_sampler" not in extra
        and budget.cpus > 1
    )


def start_live(
    dataset: Any,
    request: LoaderRequest,
    budget: Budget,
    *,
    batch_size: int | None,
    plan_for: PlanFor,
    environ: Mapping[str, str] | None = None,
) -> LiveStart:
    """The start plan and the tuner for a live-tuned loader (rules: ``stoker.autotune``)."""
    slot = _CacheSlot.find(dataset, request, budget, batch_size, environ)
    within = candidate_workers(budget)
    # One worker more than the CPUs, measured only when the workers leave CPU idle (rules).
    candidates = (*within, within[-1] + 1) if budget.cpus > 1 and within[-1] > 0 else within
    remembered = slot.read() if slot is not None else None
    if remembered is not None and remembered.workers in candidates:
        start = remembered.workers
        why = f"started from the choice remembered in {slot.path if slot else '?'}"
    else:
        remembered = None
        start = min(within[-1], DEFAULT_MAX_WORKERS)
        why = (
            f"started with {start} workers, the most this budget runs ({budget.cpus} CPUs, "
            f"{budget.source}), at most {DEFAULT_MAX_WORKERS}; nothing measured yet"
        )
    tuner = LiveTuner(
        start=start, candidates=candidates, remembered=remembered, cpu_budget=budget.cpus
    )
    tuner.decision = dataclasses.replace(tuner.decision, reason=why)
    tuning = LiveTuning(
        tuner=tuner,
        request=request,
        plan_for=plan_for,
        remember=slot.write if slot is not None else None,
        memory_cap=_memory_cap,
        cache_path=str(slot.path) if slot is not None else None,
        cpu_use=WorkerCpu(),
    )
    return LiveStart(plan=live_plan(request, start, tuner.decision, plan_for), tuning=tuning)


@dataclass(frozen=True, slots=True)
class _CacheSlot:
    """The cache file of one dataset, budget and request: the same key ``tune_loader`` uses,
    with ``workers="auto"`` and no consumer rate."""

    path: Path
    key: dict[str, Any]

    @classmethod
    def find(
        cls,
        dataset: Any,
        request: LoaderRequest,
        budget: Budget,
        batch_size: int | None,
        environ: Mapping[str, str] | None,
    ) -> _CacheSlot | None:
        if not isinstance(dataset, BatchingDataset):
            return None
        auto = dataclasses.replace(request, workers="auto")
        key = cache.cache_key(dataset.fingerprint(), auto, budget, None, batch_size)
        return cls(path=cache.cache_path(cache.cache_dir(environ), key), key=key)

    def read(self) -> Remembered | None:
        """The remembered choice: a live one with its regime, or a probe's count."""
        data = cache.read_cache(self.path, self.key)
        if data is None:
            return None
        live = data.get("live")
        try:
            if isinstance(live, dict):
                return Remembered(
                    workers=int(live["workers"]),
                    keeps_up=bool(live["keeps_up"]),
                    reason=str(live["reason"]),
                )
            # A probe's record (stoker tune before live tuning): its count, checked from scratch.
            return Remembered(
                workers=int(data["choice"]["workers"]), keeps_up=False, reason="a probe's choice"
            )
        except (KeyError, TypeError, ValueError):
            return None

    def write(self, decision: Decision, keeps_up: bool) -> None:
        """Remember a settled choice (atomically; a failure warns once, as ``stoker tune``)."""
        choice = MeasuredChoice(
            workers=decision.workers, prefetch_factor=None, reason=decision.reason
        )
        record = {
            "format": cache.CACHE_FORMAT,
            "key": self.key,
            "choice": dataclasses.asdict(choice),
            "live": {"workers": decision.workers, "keeps_up": keeps_up, "reason": decision.reason},
            "windows": [dataclasses.asdict(w) for w in decision.measured],
            "worker_memory_bytes": None,
            "probe_seconds": 0.0,
            "time_limit_seconds": 0.0,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        json.dumps(record)  # fail here, not half-way through a write, if something is not JSON
        cache.remember(self.path, record)


def _memory_cap(loader: Any) -> tuple[int, str] | None:
    """How many workers fit in the memory available now, from the running workers' USS."""
    pids = loader.worker_pids() if callable(getattr(loader, "worker_pids", None)) else []
    uss = worker_uss_bytes(pids) if pids else None
    memory = memory_budget()
    if not uss or memory.usable_bytes is None:
        return None
    # A worker's shared-memory blocks for its batches are RAM that its USS does not show (the
    # main process maps them too); counted at the most they reach.
    blocks = getattr(getattr(loader, "dataset", None), "transit_block_bytes", 0)
    blocks = blocks if isinstance(blocks, int) else 0
    per_worker = uss + blocks
    fit = memory.usable_bytes // per_worker
    shared = f" ({blocks / 2**20:.0f} MiB of it blocks in /dev/shm)" if blocks else ""
    why = (
        f"a worker uses about {per_worker / 2**20:.0f} MiB{shared} and "
        f"{memory.usable_bytes / 2**20:.0f} MiB are usable ({memory.source})"
    )
    return int(fit), why


class WorkerCpu:
    """The CPU seconds a loader's worker processes used, as a running total across worker sets.

    Each call reads ``/proc/<pid>/stat`` of the workers running now and adds what each used since
    the last call (a worker seen for the first time, since it started). A worker that exited
    between two calls loses its last part: the total can only fall short, which rules out fewer
    counts, never more. ``None`` when no worker's time can be read (no ``/proc``, no workers).
    """

    def __init__(self, read: Callable[[int], float | None] = process_cpu_seconds) -> None:
        self._read = read
        self._last: dict[int, float] = {}
        self.total = 0.0

    def __call__(self, loader: Any) -> float | None:
        pids = loader.worker_pids() if callable(getattr(loader, "worker_pids", None)) else []
        now = {pid: self._read(pid) for pid in pids}
        seen = {pid: t for pid, t in now.items() if t is not None}
        if not seen:
            return None
        self.total += sum(max(t - self._last.get(pid, 0.0), 0.0) for pid, t in seen.items())
        self._last = seen
        return self.total
