"""The tuning rules, pure: which worker counts to try, and which measured one to choose.

See ``stoker.tune`` for the rules in words; the constants here are the ones it names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stoker.plan import LoaderRequest, Measurement, max_useful_workers
from stoker.system.cpu import Budget

__all__ = [
    "CONSUMER_MARGIN",
    "WITHIN_BEST",
    "ZERO_WORKERS_FACTOR",
    "candidate_workers",
    "check_consumer_rate",
    "choose",
    "keeps_up",
    "nothing_to_measure",
]

WITHIN_BEST = 0.95
CONSUMER_MARGIN = 1.2
ZERO_WORKERS_FACTOR = 4.0
TIME_LIMIT_SECONDS = 10.0
EPOCH_FRACTION = 0.05
# A candidate below this share of the best rate after a round is stopped (clearly worse) ...
ABORT_BELOW = 0.5
# ... and one below this share of the best ends the search upwards (past the peak).
PAST_PEAK_BELOW = 0.8
PREFETCH_DEFAULT = 2
PREFETCH_MORE = 4


def candidate_workers(budget: Budget) -> tuple[int, ...]:
    """The worker counts to try on ``budget`` (see the module docstring)."""
    top = max_useful_workers(budget)
    counts = {0, top, max(top - 1, 0)}
    step = 1
    while step <= top:
        counts.add(step)
        step = step + 1 if step < 4 else int(step * 1.5)
    return tuple(sorted(c for c in counts if c <= top))


def choose(
    measurements: Sequence[Measurement],
    *,
    consumer_rate: float | None = None,
    max_workers: int | None = None,
) -> tuple[Measurement, str]:
    """Pick among measured candidates by the rules of the module docstring.

    Args:
        measurements: the candidates (skipped ones have a rate of 0 and are ignored).
        consumer_rate: the training step's batches/s, when known.
        max_workers: the most workers the memory allows (``None``: no limit known).

    Returns:
        The chosen measurement and one sentence saying why.

    Raises:
        ValueError: no candidate was measured.
    """
    usable = [
        m
        for m in measurements
        if m.batches_per_second > 0 and (max_workers is None or m.workers <= max_workers)
    ]
    if not usable:
        raise ValueError("no candidate setting could be measured")
    ordered = sorted(usable, key=lambda m: (m.workers, m.prefetch_factor or 0))
    best = max(usable, key=lambda m: m.batches_per_second)
    table = _summary(measurements)
    capped = ""
    if max_workers is not None and any(m.workers > max_workers for m in measurements):
        capped = f"; at most {max_workers} workers fit in the available memory"
    if consumer_rate is not None:
        for m in ordered:
            if keeps_up(m, consumer_rate):
                margin = ZERO_WORKERS_FACTOR if m.workers == 0 else CONSUMER_MARGIN
                return m, (
                    f"measured {table}: the fewest workers that keep up with the training step's "
                    f"{consumer_rate:g} batches/s with a {margin:g}x margin "
                    f"({consumer_rate * margin:.3g}/s){capped}"
                )
        lead = (
            f"no candidate keeps up with the training step's {consumer_rate:g} batches/s "
            f"x{CONSUMER_MARGIN:g}, so training will wait for data; "
        )
    else:
        lead = ""
    threshold = WITHIN_BEST * best.batches_per_second
    pick = next(m for m in ordered if m.batches_per_second >= threshold)
    return pick, (
        f"{lead}measured {table}: the fewest workers within {1 - WITHIN_BEST:.0%} of the best "
        f"({best.batches_per_second:.3g} batches/s with {_label(best)}){capped}"
    )


def keeps_up(m: Measurement, consumer_rate: float) -> bool:
    """Whether ``m`` feeds a training step of ``consumer_rate`` batches/s (see the module docs)."""
    margin = ZERO_WORKERS_FACTOR if m.workers == 0 else CONSUMER_MARGIN
    return m.batches_per_second >= consumer_rate * margin


def _label(m: Measurement) -> str:
    text = f"{m.workers} worker{'' if m.workers == 1 else 's'}"
    if m.prefetch_factor not in (None, PREFETCH_DEFAULT):
        text += f", prefetch {m.prefetch_factor}"
    return text


def _summary(measurements: Sequence[Measurement]) -> str:
    parts = [
        f"{_label(m)} {m.batches_per_second:.3g}" for m in measurements if m.batches_per_second > 0
    ]
    return ", ".join(parts) + " batches/s" if parts else "nothing"


def check_consumer_rate(rate: object) -> None:
    if rate is None:
        return
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        raise ValueError(
            f"consumer_rate={rate!r} is not valid: give the training step's speed in batches "
            "per second (a number > 0), or None when it is not known"
        )


def nothing_to_measure(request: LoaderRequest, budget: Budget) -> bool:
    # One CPU: the planner's rule (0 workers, or 1 with CUDA) beats any probe, whose consumer
    # cannot show the GPU wait that makes the one worker worth it.
    if budget.cpus <= 1:
        return True
    return request.workers != "auto" and request.workers in (0, None)
