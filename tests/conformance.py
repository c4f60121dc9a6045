"""A torchdata-style conformance check for anything stoker can load: same seed, same batches
for every worker count, and an interrupted run that resumes into exactly the same batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _fingerprint(batch: Any) -> Any:
    """Everything a batch holds, comparable with ==, tensors bitwise."""
    if isinstance(batch, torch.Tensor):
        raw = batch.contiguous().reshape(-1).view(torch.uint8)  # bf16 has no NumPy dtype
        return (str(batch.dtype), tuple(batch.shape), raw.numpy().tobytes())
    if isinstance(batch, dict):
        return tuple(sorted((k, _fingerprint(v)) for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        return tuple(_fingerprint(v) for v in batch)
    return batch


def run_epochs(loader: Any, epochs: int) -> list[Any]:
    return [_fingerprint(b) for _ in range(epochs) for b in loader]


def assert_deterministic_and_resumable(
    make_loader: Callable[..., Any],
    seed: int,
    midpoint: int,
    *,
    workers: Sequence[int] = (0, 1, 2),
    epochs: int = 2,
) -> None:
    """``make_loader(seed=..., workers=...)`` builds a fresh loader over the same data.

    Checks: (1) the same seed gives the same batches, bitwise, for every worker count;
    (2) another seed gives other batches; (3) stopping after ``midpoint`` batches, saving
    ``state_dict()`` and loading it into a loader with another worker count yields exactly the
    remaining batches of that epoch and then the following epochs.
    """
    reference = run_epochs(make_loader(seed=seed, workers=0), epochs)
    assert len(reference) > midpoint, "midpoint must fall inside the first epochs"
    for count in workers:
        assert run_epochs(make_loader(seed=seed, workers=count), epochs) == reference, count
    assert run_epochs(make_loader(seed=seed + 1, workers=0), epochs) != reference
    for first, second in zip(workers, reversed(workers), strict=True):
        interrupted = make_loader(seed=seed, workers=first)
        got = []
        for batch in interrupted:
            got.append(_fingerprint(batch))
            if len(got) == midpoint:
                break
        state = interrupted.state_dict()
        del interrupted
        resumed = make_loader(seed=seed, workers=second)
        resumed.load_state_dict(state)
        per_epoch = len(resumed)
        remaining_epochs = epochs - midpoint // per_epoch
        got += run_epochs(resumed, remaining_epochs)
        assert got == reference, (first, second)
