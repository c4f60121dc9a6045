"""Batches by bucket: seeded by (seed, epoch), sharded by rank, resumable.

Two pieces, both over plain numpy arrays so they stay cheap for a million images:

- ``balance_reg_repeats`` rewrites the repeats of regularisation images the way sd-scripts'
  ``DreamBoothDataset`` does, so an epoch holds about as many regularisation samples as training
  samples.
- ``BucketBatchSampler`` is a ``torch.utils.data.Sampler`` for ``DataLoader(batch_sampler=...)``.
  Each epoch it lays out every image ``repeats`` times in its batch group (a (dataset, bucket)
  pair), shuffles within each group, cuts each group into batches of that group's batch size
  (keeping a last partial batch, as sd-scripts does), shuffles the list of batches, and deals it
  out to the ranks.

**The epoch order** is a pure function of ``(seed, epoch)`` and the arrays. Group ``g`` is shuffled
by ``keyed_rng(seed, epoch, g, Stream.ORDER)``, so adding images to one bucket leaves the order
inside the other buckets alone. The batch list is shuffled by ``keyed_rng(seed, epoch,
BATCH_ORDER_POSITION, Stream.ORDER)``; ``BATCH_ORDER_POSITION`` is ``2**63``, one past the largest
int64, so no group id (held in an int64 array) can ever use the same generator.

**Sample keys.** Each batch is a ``SampleBatch``: a list of ``(epoch, position, image_index, step)``
tuples. ``position`` is the sample's index in the epoch's global, unsharded sequence (the shuffled
batches laid end to end), so one sample has one key whatever the rank or worker count; the
dataset seeds its augmentations from ``(seed, epoch, position)``. ``step`` is ``epoch *
len(sampler) + k`` for the ``k``-th batch of this rank's epoch: a count of batches per rank, which
is the optimizer step when there is no gradient accumulation. It feeds caption token warm-up
(sd-scripts' ``token_warmup_step`` compares against the optimizer step; divide by the
accumulation steps if you use them).

**Ranks.** Every rank computes the same global batch list (one seed) and takes batches ``rank,
rank + world_size, ...``. With ``even_batches="pad"`` the list is first made a multiple of
``world_size`` by repeating batches from its start, cycling if needed; a repeated batch is an
exact copy, with the same positions and hence the same keys and augmentations as the original,
and it is marked ``SampleBatch.padded``. This is what sd-scripts gets from accelerate's default
``even_batches=True``, which duplicates from the start of the data, except that stoker repeats
whole batches and leaves partial batches partial. With ``"drop"`` the tail that does not fill a
round is dropped. Either way every rank yields ``len(sampler)`` batches.

**Epochs.** ``set_epoch(e)`` makes the next ``__iter__`` run epoch ``e``. Without it, each
``__iter__`` runs the epoch after the previous one, starting at 0, so a plain ``for epoch in
range(n): for batch in loader`` loop gets epochs 0..n-1. An iteration claims its epoch when its first
batch is drawn (see ``__iter__`` for why), so an iterator that is created and never advanced
changes nothing.

**Resume.** ``state_dict()`` records the epoch in progress and how many of its batches are done;
``load_state_dict`` makes the next ``__iter__`` yield exactly the remaining batches of that epoch,
and later iterations the following epochs, as an uninterrupted run would. A ``DataLoader`` with
workers draws batches ahead of the training loop (up to ``num_workers * prefetch_factor``), so the
sampler alone would over-count. The recommended protocol: call ``mark_consumed()`` once for each
batch handed to the training loop (``make_loader`` does this); once it has been called,
``state_dict()`` counts consumed batches rather than drawn ones. ``state_dict(consumed_batches=n)``
states the count explicitly instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Literal

import numpy as np
from torch.utils.data import Sampler

from stoker.rng import Stream, keyed_rng

__all__ = [
    "AllRanksBatchSampler",
    "BATCH_ORDER_POSITION",
    "BucketBatchSampler",
    "SampleBatch",
    "SampleKey",
    "balance_reg_repeats",
]

SampleKey = tuple[int, int, int, int]
"""``(epoch, position, image_index, step)``; see the module docstring."""

BATCH_ORDER_POSITION = 2**63
"""The ``position`` of the generator that shuffles the batch list: no int64 group id can equal it."""

_STATE_VERSION = 1


def balance_reg_repeats(repeats: np.ndarray, is_reg: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Give regularisation images the repeats sd-scripts gives them.

    sd-scripts (``DreamBoothDataset.__init__``) wants as many regularisation samples per epoch as
    training samples ``T`` (the sum of the training images' repeats). It walks the regularisation
    images in order: the first pass takes each image with its own repeats until the running total
    reaches ``T`` (the image that crosses ``T`` keeps all its repeats, so the total may overshoot,
    and the images after it get 0); if one pass is not enough, later passes add one repeat to each
    image in turn and stop exactly at ``T``. With no training samples no regularisation image is
    used. Images whose repeats are already 0 (excluded) are skipped.

    Args:
        repeats: Repeats per image (``num_repeats`` of its subset), ints >= 0.
        is_reg: Per image, whether it is a regularisation image.

    Returns:
        The new repeats (a copy; training entries unchanged) and, when some regularisation images
        get 0 repeats, one sentence saying how many and why; otherwise ``None``.

    Raises:
        ValueError: The arrays differ in length or a repeat count is negative.
    """
    reps = _as_int_array("repeats", repeats)
    reg = np.asarray(is_reg, dtype=bool)
    if reg.shape != reps.shape:
        raise ValueError(
            f"is_reg has {reg.size} entries but repeats has {reps.size}; give one per image"
        )
    out = reps.copy()
    reg_idx = np.flatnonzero(reg & (reps > 0))
    if reg_idx.size == 0:
        return out, None
    train_total = int(reps[~reg].sum())
    running = np.cumsum(reps[reg_idx])
    if train_total == 0:
        out[reg_idx] = 0
    elif running[-1] >= train_total:
        crossing = int(np.searchsorted(running, train_total, side="left"))
        out[reg_idx[crossing + 1 :]] = 0
    else:
        # Later passes hand out the missing samples one per image, in order: whole rounds first.
        rounds, rest = divmod(train_total - int(running[-1]), reg_idx.size)
        out[reg_idx] += rounds
        out[reg_idx[:rest]] += 1
    unused = int(np.count_nonzero(out[reg_idx] == 0))
    if unused == 0:
        return out, None
    return out, _unused_reg_message(unused, reg_idx.size, train_total, int(running[-1]))


def _unused_reg_message(unused: int, n_reg: int, train_total: int, reg_total: int) -> str:
    if train_total == 0:
        return (
            f"{unused} of {n_reg} regularisation images are not used this run: there are no "
            "training samples to balance them against (sd-scripts uses none either)"
        )
    return (
        f"{unused} of {n_reg} regularisation images are not used this run: there are only "
        f"{train_total} training samples (with repeats) against {reg_total} regularisation "
        "samples, and sd-scripts takes regularisation images in order until it has as many; add "
        "training images or repeats, or remove regularisation images, to use them all"
    )


class SampleBatch(list[SampleKey]):
    """One batch: a list of ``SampleKey`` tuples, plus ``padded``.

    ``padded`` is true for a batch repeated to even out the ranks under ``even_batches="pad"``;
    its samples duplicate earlier ones, keys included. It compares equal to a plain list with the
    same items and pickles with its flag.
    """

    padded: bool

    def __init__(self, keys: Iterable[SampleKey] = (), *, padded: bool = False) -> None:
        super().__init__(keys)
        self.padded = padded


@dataclass(frozen=True, slots=True, kw_only=True)
class _EpochPlan:
    """One rank's batches of one epoch, as offsets into the epoch's shuffled sample array.

    Attributes:
        epoch: The epoch.
        steps_before: ``epoch * batches per rank``: the step of this rank's first batch.
        samples: Image index of every sample, grouped and shuffled within each group.
        starts: Per batch of this rank, its first entry in ``samples``.
        lengths: Per batch of this rank, its number of samples.
        positions: Per batch of this rank, the global position of its first sample.
        padded: Per batch of this rank, whether it is a repeat added by ``even_batches="pad"``.
        slots_per_step: 1 for one rank's plan; ``world_size`` for every rank's (slot ``s`` is
            then step ``s // world_size`` of its rank).
    """

    epoch: int
    steps_before: int
    slots_per_step: int = 1
    samples: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    padded: np.ndarray

    def __len__(self) -> int:
        return int(self.starts.size)

    def batch(self, k: int) -> SampleBatch:
        """The ``k``-th batch of this rank's epoch, keys as plain Python ints."""
        start, size, first = int(self.starts[k]), int(self.lengths[k]), int(self.positions[k])
        images = self.samples[start : start + size].tolist()
        keys = zip(
            repeat(self.epoch, size),
            range(first, first + size),
            images,
            repeat(self.steps_before + k // self.slots_per_step, size),
            strict=True,
        )
        return SampleBatch(keys, padded=bool(self.padded[k]))


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Bucketed, seeded, rank-sharded and resumable batches; see the module docstring for the rules.

    Args:
        groups: Batch group per image (the (dataset, bucket) id, ``0 <= g < len(batch_sizes)``);
            -1 excludes the image.
        repeats: Times each image appears per epoch; 0 excludes it.
        batch_sizes: Batch size per group id, each >= 1.
        seed: The run's seed; any int.
        shuffle: When false, groups come in id order, samples in image order, nothing shuffled.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of ranks sharing the epoch.
        even_batches: ``"pad"`` repeats batches from the start so all ranks get the same count;
            ``"drop"`` drops the tail instead.

    Raises:
        ValueError: Arrays of different lengths, non-integer arrays, negative repeats, a group id
            outside ``[-1, len(batch_sizes))``, a batch size below 1, or a bad rank, world size or
            ``even_batches``.
    """

    def __init__(
        self,
        *,
        groups: np.ndarray,
        repeats: np.ndarray,
        batch_sizes: np.ndarray,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        even_batches: Literal["pad", "drop"] = "pad",
        dataset_id: str = "",
    ) -> None:
        self._groups, self._repeats, self._batch_sizes = _check_arrays(groups, repeats, batch_sizes)
        # What the arrays were built from (a digest of image paths and sizes): a state saved over
        # another dataset with the same layout must not resume here.
        self.dataset_id = str(dataset_id)
        _check_ranks(rank, world_size, even_batches)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.even_batches: Literal["pad", "drop"] = even_batches
        active = (self._groups >= 0) & (self._repeats > 0)
        self._counts = np.bincount(
            self._groups[active], weights=self._repeats[active], minlength=self._batch_sizes.size
        ).astype(np.int64)
        self._n_batches = int(_ceil_div(self._counts, self._batch_sizes).sum())
        self._per_rank = _shard_count(self._n_batches, self.world_size, self.even_batches)
        self._caches: dict[str, Any] = {}
        self._next_epoch = 0
        self._next_start = 0
        self._current: int | None = None
        self._start = 0
        self._yielded = 0
        self._consumed = 0
        self._tracking = False
        self._iteration = 0

    def __len__(self) -> int:
        """Batches per rank per epoch; the same for every rank and epoch."""
        return self._per_rank

    def __getstate__(self) -> dict[str, Any]:
        # The layout cache is rebuilt on demand, so a pickled sampler stays the size of its inputs.
        state = self.__dict__.copy()
        state["_caches"] = {}
        return state

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` run ``epoch``.

        A resume offset from ``load_state_dict`` is kept when ``epoch`` is the resumed epoch (so a
        loop that calls ``set_epoch`` every epoch resumes correctly) and dropped otherwise.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._next_epoch:
            self._next_start = 0
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator[SampleBatch]:
        """This rank's batches of the next epoch (or the rest of a resumed one).

        The epoch is claimed when the first batch is drawn, not when ``iter()`` is called: a
        ``DataLoader`` with workers calls ``iter(batch_sampler)`` twice when it starts and throws
        the first iterator away unused (``_MultiProcessingDataLoaderIter.__init__`` then
        ``_reset(first_iter=True)``), which would otherwise skip an epoch.
        """
        return self._iterate(all_ranks=False)

    def iter_all_ranks(self) -> Iterator[SampleBatch]:
        """Every rank's batches of the next epoch, in the order the ranks take them.

        Slot ``s`` of the stream is batch ``s // world_size`` of rank ``s % world_size``, so a
        wrapper that deals batch ``s`` to rank ``s % world_size`` (accelerate's
        ``BatchSamplerShard``) hands each rank exactly what ``__iter__`` would. It claims and
        advances the epoch as ``__iter__`` does, and counts this rank's batches as drawn.
        """
        return self._iterate(all_ranks=True)

    def _iterate(self, *, all_ranks: bool) -> Iterator[SampleBatch]:
        epoch, start = self._next_epoch, self._next_start
        self._next_epoch, self._next_start = epoch + 1, 0
        self._current, self._yielded, self._consumed = epoch, start, start
        self._start = start
        self._iteration += 1
        iteration = self._iteration
        plan = self._plan(epoch, all_ranks=all_ranks)
        width = self.world_size if all_ranks else 1
        for slot in range(start * width, len(plan)):
            batch = plan.batch(slot)
            # A stale iterator from an earlier epoch must not move the count of the current one.
            if iteration == self._iteration:
                # This rank's batches among slots 0..slot: those with slot % width == rank.
                self._yielded = (slot - self.rank) // width + 1 if all_ranks else slot + 1
            yield batch

    def batch_of_iteration(self, index: int) -> SampleBatch | None:
        """The ``index``-th batch drawn by the iteration in progress (``None`` when out of range).

        Lets the loader say which samples a failed worker was loading.
        """
        if self._current is None:
            return None
        plan = self._plan(self._current)
        k = self._start + index
        return plan.batch(k) if 0 <= k < len(plan) else None

    def epoch_batches(self, epoch: int) -> list[SampleBatch]:
        """This rank's batches of ``epoch``, in order; does not touch the iteration state."""
        plan = self._plan(epoch)
        return [plan.batch(k) for k in range(len(plan))]

    def mark_consumed(self, count: int = 1) -> None:
        """Record that ``count`` more batches of the current epoch reached the training loop.

        Once called, ``state_dict()`` counts consumed batches instead of batches drawn from the
        sampler, which run ahead of the loop when the ``DataLoader`` prefetches.

        Raises:
            ValueError: No iteration has started, or more batches would be consumed than drawn.
        """
        if self._current is None:
            raise ValueError(
                "mark_consumed() was called before any iteration of the sampler started"
            )
        if count < 0 or self._consumed + count > self._yielded:
            raise ValueError(
                f"cannot mark {count} more batches consumed: {self._consumed} of the "
                f"{self._yielded} drawn in epoch {self._current} already are"
            )
        self._tracking = True
        self._consumed += count

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """The position to resume from, as plain JSON-able values.

        Args:
            consumed_batches: Batches of the epoch in progress that the training loop has used.
                Default: the count from ``mark_consumed`` if it was ever called, else the batches
                drawn from the sampler.

        Returns:
            ``version``, ``seed``, ``epoch``, ``batches_done``, ``world_size``, ``rank``,
            ``shuffle``, ``even_batches``, ``fingerprint`` (a digest of the three arrays) and, when
            the sampler was given one, ``dataset`` (the dataset's ``dataset_id``). A finished epoch
            is reported as the start of the next one.
        """
        epoch, done = self._next_epoch, self._next_start
        if self._current is not None:
            current_done = self._current_done(consumed_batches)
            if current_done < self._per_rank:
                epoch, done = self._current, current_done
        elif consumed_batches is not None:
            raise ValueError(
                "consumed_batches was given but no iteration of the sampler has started"
            )
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": epoch,
            "batches_done": done,
            "world_size": self.world_size,
            "rank": self.rank,
            "shuffle": self.shuffle,
            "even_batches": self.even_batches,
            "fingerprint": self._fingerprint(),
            **({"dataset": self.dataset_id} if self.dataset_id else {}),
        }

    def _current_done(self, consumed_batches: int | None) -> int:
        if consumed_batches is None:
            return self._consumed if self._tracking else self._yielded
        if not 0 <= consumed_batches <= self._per_rank:
            raise ValueError(
                f"consumed_batches must be between 0 and {self._per_rank} (batches per rank per "
                f"epoch), got {consumed_batches}"
            )
        return int(consumed_batches)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``__iter__`` continue from ``state`` (from ``state_dict``).

        The state may come from any rank: all ranks advance in step, so rank 0's checkpoint serves
        every rank.

        Raises:
            ValueError: The state is malformed, or was saved by a sampler over different arrays,
                seed, shuffle, world size or padding policy, where "the remaining batches" would
                mean something else.
        """
        if not isinstance(state, dict):
            raise ValueError(f"sampler state must be a dict from state_dict(), got {type(state)}")
        _check_state_matches(state, self._identity())
        epoch = _state_int(state, "epoch", _MAX_EPOCH)
        done = _state_int(state, "batches_done", self._per_rank)
        if done >= self._per_rank:
            epoch, done = epoch + 1, 0
        self._next_epoch, self._next_start = epoch, done
        self._current, self._yielded, self._consumed = None, 0, 0

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "even_batches": self.even_batches,
            "fingerprint": self._fingerprint(),
            **({"dataset": self.dataset_id} if self.dataset_id else {}),
        }

    def _fingerprint(self) -> str:
        if "fingerprint" not in self._caches:
            digest = hashlib.blake2b(digest_size=16)
            for arr in (self._groups, self._repeats, self._batch_sizes):
                digest.update(arr.size.to_bytes(8, "little"))
                digest.update(arr.astype("<i8").tobytes())
            self._caches["fingerprint"] = digest.hexdigest()
        return str(self._caches["fingerprint"])

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch-independent part, built once per process and cached.

        Returns the image index of every sample (group after group, image order within a group;
        int32 when it fits, which halves the memory the per-epoch shuffle walks through) and the
        start and length of every batch in that order.
        """
        if "layout" not in self._caches:
            active = np.flatnonzero((self._groups >= 0) & (self._repeats > 0))
            by_group = active[np.argsort(self._groups[active], kind="stable")]
            dtype = np.int32 if self._groups.size < 2**31 else np.int64
            samples = np.repeat(by_group.astype(dtype), self._repeats[by_group])
            starts, lengths = _cut_batches(self._counts, self._batch_sizes)
            self._caches["layout"] = (samples, starts, lengths)
        samples, starts, lengths = self._caches["layout"]
        return samples, starts, lengths

    def _plan(self, epoch: int, *, all_ranks: bool = False) -> _EpochPlan:
        """Lay out ``epoch``: shuffle within groups, cut batches, shuffle them, take this rank's.

        With ``all_ranks`` every rank's slots are kept, in slot order (see ``iter_all_ranks``).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        samples, starts, lengths = self._layout()
        if self.shuffle:
            samples = _shuffle_within_groups(samples, self._counts, self.seed, epoch)
            order = keyed_rng(self.seed, epoch, BATCH_ORDER_POSITION, Stream.ORDER)
            perm = order.permutation(starts.size)
            starts, lengths = starts[perm], lengths[perm]
        positions = np.cumsum(lengths) - lengths
        width = self.world_size
        slots = np.arange(
            0 if all_ranks else self.rank, self._per_rank * width, 1 if all_ranks else width
        )
        mine = slots % max(starts.size, 1)
        return _EpochPlan(
            epoch=epoch,
            steps_before=epoch * self._per_rank,
            slots_per_step=width if all_ranks else 1,
            samples=samples,
            starts=starts[mine],
            lengths=lengths[mine],
            positions=positions[mine],
            padded=slots >= starts.size,
        )


class AllRanksBatchSampler(Sampler[SampleBatch]):
    """Every rank's batches, as a distributed wrapper expects an unsharded batch sampler to be.

    ``make_loader`` gives this as the DataLoader's ``batch_sampler`` and iterates
    ``rank_sampler`` itself. A wrapper that shards ``loader.batch_sampler`` again by dealing batch
    ``s`` to rank ``s % world_size`` (``accelerator.prepare``) then gets each rank exactly the
    batches stoker would give it, instead of a second cut that loses half the data. There is no
    ``batch_size`` attribute on purpose: accelerate then treats batches as variable in size and
    keeps partial bucket batches whole.

    Attributes:
        rank_sampler: This rank's ``BucketBatchSampler``.
    """

    def __init__(self, rank_sampler: BucketBatchSampler) -> None:
        self.rank_sampler = rank_sampler

    def __iter__(self) -> Iterator[SampleBatch]:
        return self.rank_sampler.iter_all_ranks()

    def __len__(self) -> int:
        """All ranks' batches per epoch: a whole number of rounds, so a wrapper pads nothing."""
        return len(self.rank_sampler) * self.rank_sampler.world_size


def _as_int_array(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array with one entry per item, got shape {arr.shape}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    out = arr.astype(np.int64, copy=True)
    if out.size and out.min() < 0 and name != "groups":
        raise ValueError(f"{name} must be >= 0; entry {int(np.argmin(out))} is {int(out.min())}")
    return out


def _check_arrays(
    groups: np.ndarray, repeats: np.ndarray, batch_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated int64 copies of the sampler's arrays; a clear ValueError for anything unusable."""
    g = _as_int_array("groups", groups)
    r = _as_int_array("repeats", repeats)
    b = _as_int_array("batch_sizes", batch_sizes)
    if g.size != r.size:
        raise ValueError(
            f"groups has {g.size} entries but repeats has {r.size}; give one per image"
        )
    if b.size and b.min() < 1:
        raise ValueError(
            f"every batch size must be >= 1; group {int(np.argmin(b))} has {int(b.min())}"
        )
    if g.size and (g.min() < -1 or g.max() >= b.size):
        bad = int(np.flatnonzero((g < -1) | (g >= b.size))[0])
        raise ValueError(
            f"image {bad} has group {int(g[bad])}, but group ids run from 0 to {b.size - 1} "
            "(one per batch size) and -1 excludes an image"
        )
    for arr in (g, r, b):
        arr.flags.writeable = False
    return g, r, b


def _check_ranks(rank: int, world_size: int, even_batches: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}"
        )
    if even_batches not in ("pad", "drop"):
        raise ValueError(f"even_batches must be 'pad' or 'drop', got {even_batches!r}")


_MAX_EPOCH = 2**31 - 1  # no run trains for more; larger numbers are corrupt states


def _state_int(state: dict[str, Any], key: str, most: int) -> int:
    """A whole-number field of a state, checked for type and range (never coerced)."""
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"sampler state field {key} must be a whole number, got {value!r}; pass a "
            "state_dict() result unchanged"
        )
    if not 0 <= value <= most:
        raise ValueError(f"sampler state field {key} = {value} is outside 0..{most}")
    return value


def _check_state_matches(state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise a ValueError naming every field where ``state`` disagrees with this sampler."""
    missing = sorted({"version", "epoch", "batches_done", *identity} - set(state))
    if missing:
        raise ValueError(
            f"sampler state is missing {', '.join(missing)}; pass a state_dict() result"
        )
    if state["version"] != _STATE_VERSION:
        raise ValueError(f"sampler state version {state['version']} is not {_STATE_VERSION}")
    diffs = [
        f"{key} {state[key]!r} != {value!r}"
        for key, value in identity.items()
        if state[key] != value
    ]
    if diffs:
        raise ValueError(
            "sampler state was saved for a different run (" + "; ".join(diffs) + "): resume with "
            "the same dataset, repeats, buckets, batch sizes, seed, shuffle, world size and even_batches"
        )


def _ceil_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(-(-a // b))


def _shard_count(n_batches: int, world_size: int, even_batches: str) -> int:
    """Batches per rank: the global count rounded up ("pad") or down ("drop") to a full round."""
    if even_batches == "pad":
        return -(-n_batches // world_size)
    return n_batches // world_size


def _shuffle_within_groups(
    samples: np.ndarray, counts: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """A copy of ``samples`` with each group's segment permuted by that group's own generator."""
    out = samples.copy()
    ends = np.cumsum(counts)
    for group in np.flatnonzero(counts > 1).tolist():
        segment = out[ends[group] - counts[group] : ends[group]]
        keyed_rng(seed, epoch, group, Stream.ORDER).shuffle(segment)
    return out


def _cut_batches(counts: np.ndarray, batch_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every batch, group after group; a group's last batch may be partial."""
    per_group = _ceil_div(counts, batch_sizes)
    group_of = np.repeat(np.arange(counts.size), per_group)
    first_of_group = np.cumsum(per_group) - per_group
    k = np.arange(group_of.size) - first_of_group[group_of]
    group_start = np.cumsum(counts) - counts
    starts = group_start[group_of] + k * batch_sizes[group_of]
    lengths = np.minimum(batch_sizes[group_of], group_start[group_of] + counts[group_of] - starts)
    return starts, lengths
