"""What a dataset offers stoker's loader, tuner, bench and cache: the ``BatchingDataset`` protocol.

A dataset that batches itself (``load_dataset``'s ``StokerDataset``, or your own) gives the loader
its batch sampler and collate function, its seed, and a fingerprint; with it stoker shards by
rank, resumes exactly, and changes the worker count without changing a batch. The loader checks
``isinstance(dataset, BatchingDataset)`` once; nothing probes single attributes, so a renamed
member fails that check (and mypy, and ``tests/test_protocol.py``) instead of quietly falling
back to defaults.

Any other map-style torch dataset (``__getitem__`` and ``__len__``) is the documented plain case:
``make_loader`` hands it to DataLoader as it is, with DataLoader's own ``batch_size``, ``shuffle``
(seeded by ``seed``) and ``collate_fn``; what needs the protocol (``state_dict()`` resume, rank
sharding, ``workers="auto"`` remembered across runs) says so when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["BatchingDataset", "ResumableBatchSampler"]


@runtime_checkable
class ResumableBatchSampler(Protocol):
    """A batch sampler that knows where it is: the loader marks each batch the training loop
    received, so ``state_dict()`` counts those and not the ones prefetched ahead."""

    def __iter__(self) -> Iterator[Sequence[Any]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def mark_consumed(self, count: int = 1) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def batch_of_iteration(self, index: int) -> Sequence[Any] | None:
        """The batch sent ``index``-th in this epoch's iteration (to name what a dead worker held)."""
        ...


@runtime_checkable
class BatchingDataset(Protocol):
    """A dataset that batches itself (see the module docstring).

    Attributes:
        seed: the augmentation seed its samples are drawn with.
        output: ``"float"`` or ``"uint8"`` images (the input-bound advice depends on it).
        fast_decode: whether decoding already takes the fast path (same).
        decode_problems: files that failed in a worker; the loader appends to it.
        collate_fn: turns what ``__getitems__`` returns into a batch.
    """

    seed: int
    output: str
    fast_decode: bool
    decode_problems: list[Any]
    collate_fn: Callable[[Any], Any]

    def __len__(self) -> int: ...

    def with_seed(self, seed: int) -> BatchingDataset:
        """The same dataset with another augmentation seed (arrays shared, not copied)."""
        ...

    def make_batch_sampler(
        self,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        even_batches: Literal["pad", "drop"] = "pad",
    ) -> ResumableBatchSampler:
        """The batches of every epoch, this rank's share of them."""
        ...

    def batch_sizes_in_use(self) -> list[int]:
        """The distinct batch sizes its config sets (the loader's ``batch_size`` is not used)."""
        ...

    def fingerprint(self) -> str:
        """A digest of everything that makes loading it fast or slow (files, sizes, buckets,
        settings): the tuner's remembered choice is keyed on it."""
        ...

    def for_workers(self) -> BatchingDataset:
        """The dataset DataLoader workers run (``self`` when nothing changes): it may send its
        batches in a cheaper form that `arrive` finishes, such as uint8 images for float ones."""
        ...

    def arrive(self, batch: Any) -> Any:
        """Finish a batch in the main process, where the loop receives it (called by the loader
        for every batch, with or without workers); the result is what the user gets."""
        ...

    def sample_paths(self, batch: Sequence[Any]) -> list[str]:
        """The files behind one batch of its sampler, to name them in error messages."""
        ...
