"""``make_loader``: plan for this machine, measure when asked (``workers="auto"``), build.

The top of the loader stack: ``stoker.planning`` decides, ``stoker.tune`` measures through a
factory this module hands it (so tune never imports the loader), ``loader.build`` builds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np

from stoker.data.protocol import BatchingDataset
from stoker.loader.build import StokerLoader, build_loader
from stoker.monitor import InputMonitor
from stoker.plan import DATALOADER_NAMES, LoaderPlan, LoaderRequest
from stoker.planning import plan_request, resolve_budget
from stoker.system.cpu import Budget
from stoker.tune import LoaderFactory, TuneResult, tune

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
    if "auto" in (request.workers, request.prefetch_factor) and hasattr(dataset, "__len__"):
        budget = resolve_budget(budget)
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
    plan = plan_request(request, budget=budget, measured=measured)
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
    factory = loader_factory or _probe_factory(dataset, seed, loader_kwargs or {})
    return tune(dataset, loader_factory=factory, seed=seed, **options)


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
