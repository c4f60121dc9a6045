"""Run live tuning with no training loop: what ``stoker tune`` does, for its table.

The loader is the one training would use (``make_loader(dataset, workers="auto")``), so the same
rules decide on the same timings; the consumer is either nothing (a loop that only takes batches)
or a simulated training step that sleeps ``1 / consumer_rate`` seconds per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stoker.autotune.rules import Decision, Switch

__all__ = ["OfflineRun", "run_without_training"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OfflineRun:
    """What a run without training found.

    Attributes:
        decision: the tuner's latest decision (its ``measured`` windows make the table).
        settled: whether the comparison was finished.
        batches: batches loaded.
        seconds: how long it ran.
        switches: the worker count changes on the way.
        stopped: why it stopped, in words.
        max_seconds: its time limit.
    """

    decision: Decision
    settled: bool
    batches: int
    seconds: float
    switches: tuple[Switch, ...]
    stopped: str
    max_seconds: float


def run_without_training(
    loader: Any,
    *,
    epochs: int = 2,
    max_seconds: float = 60.0,
    consumer_rate: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> OfflineRun:
    """Iterate ``loader`` (a live-tuned ``StokerLoader``) until its tuner settles, ``epochs``
    epochs pass or ``max_seconds`` run out, sleeping ``1 / consumer_rate`` s per batch.

    Raises:
        ValueError: ``loader`` is not tuned live.
    """
    tuning = getattr(loader, "_tuning", None)
    if tuning is None:
        raise ValueError("this loader has a fixed worker count; make it with workers='auto'")
    began = clock()
    batches = 0
    stopped = ""
    for _ in range(epochs):
        for _batch in loader:
            batches += 1
            if consumer_rate:
                sleep(1.0 / consumer_rate)
            if tuning.tuner.settled:
                stopped = "settled"
                break
            if clock() - began >= max_seconds:
                stopped = f"the time limit ({max_seconds:g} s) came before the comparison finished"
                break
        if stopped:
            break
    return OfflineRun(
        decision=tuning.tuner.decision,
        settled=tuning.tuner.settled,
        batches=batches,
        seconds=clock() - began,
        switches=tuple(tuning.switches),
        stopped=stopped or f"{epochs} epochs ran before the comparison was finished",
        max_seconds=max_seconds,
    )
