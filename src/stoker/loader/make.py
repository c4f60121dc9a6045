"""``make_loader``: plan for this machine, measure when asked (``workers="auto"``), build.

The top of the loader stack: ``stoker.planning`` decides, ``stoker.tune`` measures through a
factory this module hands it (so tune never imports the loader), ``loader.build`` builds.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from stoker.autotune.driver import measurements_of
from stoker.autotune.edges import start_live, tunes_live
from stoker.autotune.offline import run_without_training
from stoker.data.protocol import BatchingDataset
from stoker.loader.build import StokerLoader, build_loader
from stoker.monitor import InputMonitor
from stoker.plan import DATALOADER_NAMES, LoaderPlan, LoaderRequest, MeasuredChoice
from stoker.planning import plan_request, resolve_budget
from stoker.system.cpu import Budget
from stoker.system.memory import memory_budget
from stoker.tune import LoaderFactory, TuneResult, tune
from stoker.tune.rules import PREFETCH_DEFAULT, check_consumer_rate
from stoker.warn import tell

__all__ = ["make_loader", "tune_loader"]

# DataLoader's own names for the settings stoker plans, accepted by make_loader as aliases so
# code written for DataLoader ports over unchanged.
_ALIASES = {torch: ours for ours, torch in DATALOADER_NAMES.items() if torch != ours}


def make_loader(
    dataset: Any,
    *,
    batch_size: int | None = 1,
    shuffle: bool = False,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | Literal["auto"] | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    seed: int | None = None,
    budget: Budget | int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    even_batches: Literal["pad", "drop"] = "pad",
    consumer_rate: float | None = None,
    monitor: bool | InputMonitor = True,
    **dataloader_kwargs: Any,
) -> StokerLoader:
    """Build a DataLoader for ``dataset`` from a plan that is valid on this machine.

    Settings are planned by ``plan_loader`` (changes are warned once). ``seed`` fixes the shuffle
    and every worker's ``random``/NumPy/torch seeds; ``None`` draws one, kept as ``loader.seed``.
    DataLoader's own names ``num_workers``, ``persistent_workers`` and ``multiprocessing_context``
    are accepted as aliases; other keyword arguments go to DataLoader unchanged.

    For stoker datasets (``load_dataset``) the dataset batches by bucket with the config's batch
    sizes, and ``rank``/``world_size`` (default: ``RANK``/``WORLD_SIZE`` set by torchrun or
    accelerate, else one process) shard whole batches across ranks: each rank gets the same
    number of batches per epoch; ``even_batches`` says whether the remainder is padded with
    batches from the start of the epoch (``"pad"``) or dropped (``"drop"``).

    ``workers="auto"`` (or ``prefetch_factor="auto"``) measures candidate settings on this
    dataset first and remembers the choice on disk (``tune_loader``; rules in ``stoker.tune``);
    ``consumer_rate`` is the training step's speed in batches/s, when known, so the fewest
    workers that keep up are chosen. A dataset that cannot be measured (one without ``len``) gets
    the default, as ``plan_loader`` does.

    ``monitor`` times how long the training loop waits for each batch (``loader.stats()``) and
    warns once when it waits too much (``stoker.monitor``); ``False`` turns it off, and an
    ``InputMonitor`` sets its window, threshold and clock.
    """
    settings: dict[str, Any] = {
        "workers": workers,
        "persistent": persistent,
        "start_method": start_method,
    }
    for alias, name in _ALIASES.items():
        if alias in dataloader_kwargs:
            value = dataloader_kwargs.pop(alias)
            if settings[name] is not None:
                raise ValueError(f"give either {name}= or {alias}=, not both")
            settings[name] = value
    request = LoaderRequest(
        workers=settings["workers"],
        persistent=settings["persistent"],
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=settings["start_method"],
    )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed={seed!r} is not valid: use a whole number (e.g. seed=42) or None")
    if seed is None:
        seed = dataset.seed if isinstance(dataset, BatchingDataset) else secrets.randbits(63)
    seed = int(seed)
    measured = None
    live = None
    budget = resolve_budget(budget)
    if tunes_live(request, dataset, budget, dataloader_kwargs):
        # --- live tuning (stoker.autotune): start from a remembered or the budget's count ---
        live_budget = budget
        live = start_live(
            dataset,
            request,
            live_budget,
            batch_size=batch_size,
            plan_for=lambda fixed: plan_request(fixed, budget=live_budget, warn=False),
        )
        tell(live.plan.adjustments)
    elif "auto" in (request.workers, request.prefetch_factor) and hasattr(dataset, "__len__"):
        result = tune_loader(
            dataset,
            request=request,
            batch_size=batch_size,
            budget=budget,
            consumer_rate=consumer_rate,
            seed=seed,
            loader_kwargs=dataloader_kwargs,
        )
        measured = result.choice
    plan = (
        live.plan if live is not None else plan_request(request, budget=budget, measured=measured)
    )
    return build_loader(
        dataset,
        plan,
        seed=seed,
        batch_size=batch_size,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        even_batches=even_batches,
        monitor=monitor,
        dataloader_kwargs=dataloader_kwargs,
        tuning=live.tuning if live is not None else None,
    )


def tune_loader(
    dataset: Any,
    *,
    loader_kwargs: Mapping[str, Any] | None = None,
    loader_factory: LoaderFactory | None = None,
    seed: int = 0,
    **options: Any,
) -> TuneResult:
    """Measure ``dataset`` and choose ``workers="auto"``: ``stoker.tune.tune`` with candidate
    loaders built by ``build_loader`` (unmonitored, over the probe's batches, with
    ``loader_kwargs`` such as ``collate_fn``). ``options`` are ``stoker.tune.tune``'s
    (``request``, ``batch_size``, ``budget``, ``consumer_rate``, ``cache``, ``clock``, ...)."""
    request = options.get("request") or LoaderRequest(workers="auto")
    budget = resolve_budget(options.get("budget"))
    if loader_factory is None and tunes_live(request, dataset, budget, loader_kwargs or {}):
        rest = {k: v for k, v in options.items() if k not in ("request", "budget")}
        return _tune_live(dataset, request, budget, seed, loader_kwargs or {}, **rest)
    factory = loader_factory or _probe_factory(dataset, seed, loader_kwargs or {})
    return tune(dataset, loader_factory=factory, seed=seed, **options)


# --- live tuning (stoker.autotune): a stoker dataset is tuned by running its loader ---------------


def _tune_live(
    dataset: Any,
    request: LoaderRequest,
    budget: Budget,
    seed: int,
    loader_kwargs: Mapping[str, Any],
    **options: Any,
) -> TuneResult:
    """``tune_loader`` for a dataset the loader tunes live: the same loader and rules, over up to
    two epochs, with no consumer (or one that sleeps ``1 / consumer_rate`` s per batch)."""
    consumer_rate = options.get("consumer_rate")
    check_consumer_rate(consumer_rate)
    clock = options.get("clock") or time.perf_counter
    began = clock()
    loader = make_loader(
        dataset,
        workers="auto",
        persistent=request.persistent,
        pin_memory=request.pin_memory,
        timeout=request.timeout,
        start_method=request.start_method,
        seed=seed,
        budget=budget,
        monitor=False,
        **{k: v for k, v in loader_kwargs.items() if k != "batch_sampler"},
    )
    tuning = loader._tuning
    assert tuning is not None  # tunes_live() said the loader would have one
    if not options.get("cache", True):
        tuning.tuner.remembered, tuning.remember, tuning.cache_path = None, None, None
    run = run_without_training(loader, consumer_rate=consumer_rate, clock=clock)
    decision = run.decision
    choice = MeasuredChoice(
        workers=decision.workers,
        prefetch_factor=None,
        reason=decision.reason if run.settled else f"{decision.reason} ({run.stopped})",
        measurements=measurements_of(decision, PREFETCH_DEFAULT),
    )
    return TuneResult(
        choice=choice,
        plan=plan_request(request, budget=budget, warn=False, measured=choice),
        memory=memory_budget(),
        worker_memory_bytes=None,
        max_workers_by_memory=None,
        probe_seconds=run.seconds,
        seconds=clock() - began,
        time_limit_seconds=run.max_seconds,
        consumer_rate=consumer_rate,
        cached=decision.reason.startswith("remembered"),
        cache_path=tuning.cache_path,
    )


def _probe_factory(dataset: Any, seed: int, loader_kwargs: Mapping[str, Any]) -> LoaderFactory:
    """Candidates built by ``build_loader`` itself, unmonitored, over the probe's batches."""
    extra = {
        k: v for k, v in loader_kwargs.items() if k not in ("sampler", "batch_sampler", "drop_last")
    }

    def build(plan: LoaderPlan, batches: Iterable[Any]) -> Iterable[Any]:
        return build_loader(
            dataset,
            plan,
            seed=seed,
            monitor=False,
            dataloader_kwargs={**extra, "batch_sampler": batches},
        )

    return build
