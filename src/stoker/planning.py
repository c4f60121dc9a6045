"""Plan a loader for this machine: the pure rules of ``stoker.plan`` fed with what ``stoker.system`` reads.

``plan_loader`` is the public entry; the tuner and ``make_loader`` call ``plan_request`` with a
ready ``LoaderRequest``. Each change is told once per process (``stoker.warn.tell``).
"""

from __future__ import annotations

import logging
from typing import Literal

from stoker.plan import LoaderPlan, LoaderRequest, MeasuredChoice, make_plan
from stoker.system.cpu import Budget, cpu_budget
from stoker.system.platform import cuda_available, default_start_method, start_methods
from stoker.warn import tell

__all__ = ["plan_loader", "plan_request", "resolve_budget"]

logger = logging.getLogger("stoker")


def plan_loader(
    *,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | Literal["auto"] | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    budget: Budget | int | None = None,
    warn: bool = True,
    measured: MeasuredChoice | None = None,
) -> LoaderPlan:
    """Plan DataLoader settings that are always valid on this machine (rules: ``stoker.plan``).

    Args are ``LoaderRequest``'s fields; ``budget`` is a ``Budget``, a CPU count, or ``None`` to
    measure it with ``cpu_budget()``. With ``warn`` each change is told once per process.
    ``measured`` is a probe's choice (``stoker.tune_loader(...).choice``) for the fields asked as
    ``"auto"``; without one, ``"auto"`` means the default and ``plan.defaults`` says so.

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
    return plan_request(request, budget=budget, warn=warn, measured=measured)


def resolve_budget(budget: Budget | int | None) -> Budget:
    """A ``Budget`` from a ``Budget``, a CPU count, or ``None`` (measured by ``cpu_budget()``)."""
    if budget is None:
        return cpu_budget()
    if not isinstance(budget, Budget):
        return Budget.fixed(budget)
    return budget


def plan_request(
    request: LoaderRequest,
    *,
    budget: Budget | int | None = None,
    warn: bool = True,
    measured: MeasuredChoice | None = None,
) -> LoaderPlan:
    """``plan_loader`` for a ready ``LoaderRequest``."""
    budget = resolve_budget(budget)
    plan = make_plan(
        request,
        budget,
        cuda_available=cuda_available(),
        start_methods=start_methods(),
        default_start_method=default_start_method(),
        measured=measured,
    )
    if warn:
        tell(plan.adjustments)
    for note in plan.defaults:
        logger.debug("stoker chose %s", note)
    return plan
