"""Build a real ``torch.utils.data.DataLoader`` from a plan; the only module that constructs one.

``plan_loader`` reads what the platform offers (CUDA, start methods, the CPU budget), plans, and
tells each change once per process as a ``StokerWarning`` and on the ``stoker`` logger.
``make_loader`` builds the DataLoader from that plan, with deterministic worker seeds.
"""

from __future__ import annotations

import logging
import random
import secrets
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader

from stoker.budget import Budget, cpu_budget
from stoker.errors import StokerWarning
from stoker.plan import Adjustment, LoaderPlan, LoaderRequest, make_plan

__all__ = ["StokerLoader", "make_loader", "plan_loader"]

logger = logging.getLogger("stoker")

# Adjustments already told in this process: warn once, not once per epoch or per loader.
_told: set[tuple[str, str, str, str]] = set()

# DataLoader's own names for the settings stoker plans, accepted by make_loader as aliases so
# code written for DataLoader ports over unchanged.
_ALIASES = {
    "num_workers": "workers",
    "persistent_workers": "persistent",
    "multiprocessing_context": "start_method",
}


def tell(adjustments: Iterable[Adjustment]) -> None:
    """Warn about each adjustment once per process (``StokerWarning``) and log it."""
    for adj in adjustments:
        key = (adj.setting, repr(adj.requested), repr(adj.chosen), adj.reason)
        if key in _told:
            continue
        _told.add(key)
        message = (
            f"stoker changed {adj.setting} from {adj.requested!r} to {adj.chosen!r}: {adj.reason}"
        )
        logger.warning(message)
        warnings.warn(message, StokerWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside stoker, so warnings point at the user's line."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("stoker"):
        frame = frame.f_back
        level += 1
    return level


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not stop data loading
        return False


def plan_loader(
    *,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    budget: Budget | int | None = None,
    warn: bool = True,
) -> LoaderPlan:
    """Plan DataLoader settings that are always valid on this machine (rules: ``stoker.plan``).

    Args are ``LoaderRequest``'s fields; ``budget`` is a ``Budget``, a CPU count, or ``None`` to
    measure it with ``cpu_budget()``. With ``warn`` each change is told once per process.

    Raises:
        ValueError: a setting has no safe meaning (``workers="eight"``, ``prefetch_factor=-1``).
    """
    request = LoaderRequest(
        workers=workers,
        persistent=persistent,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=start_method,
    )
    return plan_request(request, budget=budget, warn=warn)


def plan_request(
    request: LoaderRequest, *, budget: Budget | int | None = None, warn: bool = True
) -> LoaderPlan:
    """``plan_loader`` for a ready ``LoaderRequest``."""
    if budget is None:
        budget = cpu_budget()
    elif not isinstance(budget, Budget):
        budget = Budget.fixed(budget)
    methods = torch.multiprocessing.get_all_start_methods()
    plan = make_plan(
        request,
        budget,
        cuda_available=_cuda_available(),
        start_methods=methods,
        default_start_method=methods[0] if methods else None,
    )
    if warn:
        tell(plan.adjustments)
    for note in plan.defaults:
        logger.debug("stoker chose %s", note)
    return plan


class WorkerInit:
    """Seeds ``random``, NumPy and torch in each worker from (seed, worker id); picklable for spawn.

    Each worker also gets one intra-op thread: workers are already one process per CPU, and more
    threads per worker would oversubscribe the budget.
    """

    def __init__(self, seed: int, user_fn: Callable[[int], None] | None = None) -> None:
        self.seed = seed
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        state = np.random.SeedSequence([self.seed, worker_id]).generate_state(2, dtype=np.uint32)
        worker_seed = (int(state[0]) << 32) | int(state[1])
        random.seed(worker_seed)
        np.random.seed(int(state[0]))
        torch.manual_seed(worker_seed)
        torch.set_num_threads(1)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class StokerLoader(DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` that knows the plan it was built from and its seed.

    Batches from stoker datasets carry a ``replaced`` list: files that failed to decode in a
    worker and were replaced by another image of their bucket. The loader moves these into
    ``dataset.decode_problems`` in the main process and warns once per file.
    """

    plan: LoaderPlan
    seed: int

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, dict) and batch.get("replaced"):
                self._record_replaced(batch["replaced"])
            yield batch

    def _record_replaced(self, replaced: list[tuple[str, str]]) -> None:
        from stoker.data.catalog import Problem

        known = getattr(self.dataset, "decode_problems", None)
        for path, reason in replaced:
            problem = Problem(path=path, reason=reason, stage="decode", action="replaced")
            if isinstance(known, list) and problem not in known:
                known.append(problem)
                message = (
                    f"stoker could not decode {path} ({reason}); it was replaced by another "
                    "image of its bucket. Fix or remove the file; stoker scan lists bad files."
                )
                logger.warning(message)
                warnings.warn(message, StokerWarning, stacklevel=2)


def make_loader(
    dataset: Any,
    *,
    batch_size: int | None = 1,
    shuffle: bool = False,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    seed: int | None = None,
    budget: Budget | int | None = None,
    **dataloader_kwargs: Any,
) -> StokerLoader:
    """Build a DataLoader for ``dataset`` from a plan that is valid on this machine.

    Settings are planned by ``plan_loader`` (changes are warned once). ``seed`` fixes the shuffle
    and every worker's ``random``/NumPy/torch seeds; ``None`` draws one, kept as ``loader.seed``.
    DataLoader's own names ``num_workers``, ``persistent_workers`` and ``multiprocessing_context``
    are accepted as aliases; other keyword arguments go to DataLoader unchanged.
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
    if seed is None:
        seed = getattr(dataset, "seed", None)
        seed = secrets.randbits(63) if seed is None else seed
    plan = plan_loader(
        workers=settings["workers"],
        persistent=settings["persistent"],
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=settings["start_method"],
        budget=budget,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    worker_init = WorkerInit(seed, dataloader_kwargs.pop("worker_init_fn", None))
    if callable(getattr(dataset, "make_batch_sampler", None)):
        # stoker datasets batch by bucket themselves; batch_size and shuffle go to their sampler.
        if getattr(dataset, "seed", seed) != seed:
            dataset = dataset.with_seed(seed)
        dataloader_kwargs.setdefault(
            "batch_sampler", dataset.make_batch_sampler(seed=seed, shuffle=shuffle)
        )
        dataloader_kwargs.setdefault("collate_fn", dataset.collate_fn)
        batch_size, shuffle = 1, False
    loader = StokerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        worker_init_fn=worker_init,
        **plan.kwargs,
        **dataloader_kwargs,
    )
    loader.plan = plan
    loader.seed = seed
    return loader
