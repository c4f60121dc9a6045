"""BucketBatchSampler and regularisation balancing: sd-scripts' rules, determinism, sharding, resume."""

from __future__ import annotations

import functools
import json
import pickle
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from stoker.data.sampler import (
    AllRanksBatchSampler,
    BucketBatchSampler,
    SampleBatch,
    balance_reg_repeats,
)

# 13 images in 3 groups; image 7 (group -1) and image 5 (repeats 0) are excluded: 19 samples.
GROUPS = np.array([0, 1, 0, 2, 1, 1, 0, -1, 2, 0, 1, 2, 0])
REPEATS = np.array([2, 1, 3, 1, 2, 0, 1, 4, 2, 1, 3, 2, 1])
BATCH_SIZES = np.array([3, 2, 4])
N_SAMPLES = int(REPEATS[GROUPS >= 0].sum())


def _sampler(**overrides: object) -> BucketBatchSampler:
    kwargs: dict[str, object] = {
        "groups": GROUPS,
        "repeats": REPEATS,
        "batch_sizes": BATCH_SIZES,
        "seed": 7,
    }
    kwargs.update(overrides)
    return BucketBatchSampler(**kwargs)  # type: ignore[arg-type]


def _images(batches: list[SampleBatch]) -> list[int]:
    return [key[2] for batch in batches for key in batch]


def _positions(batches: list[SampleBatch]) -> list[int]:
    return [key[1] for batch in batches for key in batch]


def _unstepped(batch: SampleBatch) -> list[tuple[int, int, int]]:
    """A batch's keys without the step, which counts each rank's own batches."""
    return [(epoch, position, image) for epoch, position, image, _ in batch]


def _expected_counts(groups: np.ndarray, repeats: np.ndarray) -> Counter[int]:
    return Counter(
        {
            i: int(r)
            for i, (g, r) in enumerate(zip(groups, repeats, strict=True))
            if g >= 0 and r > 0
        }
    )


# --- epoch layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "ordered"])
def test_batches_never_mix_groups_and_respect_batch_size(shuffle: bool) -> None:
    for batch in _sampler(shuffle=shuffle).epoch_batches(0):
        groups = {int(GROUPS[key[2]]) for key in batch}
        assert len(groups) == 1
        assert 1 <= len(batch) <= BATCH_SIZES[groups.pop()]


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "ordered"])
def test_every_sample_appears_repeats_times(shuffle: bool) -> None:
    sampler = _sampler(shuffle=shuffle)
    for epoch in range(3):
        assert Counter(_images(sampler.epoch_batches(epoch))) == _expected_counts(GROUPS, REPEATS)


def test_unshuffled_order_is_groups_in_id_order_images_in_order() -> None:
    batches = _sampler(shuffle=False).epoch_batches(0)
    # Group 0: images 0,0,2,2,2,6,9,12 in batches of 3 (last partial batch kept, as sd-scripts);
    # group 1: 1,4,4,10,10,10 in 2s; group 2: 3,8,8,11,11 in 4s.
    assert [[key[2] for key in batch] for batch in batches] == [
        [0, 0, 2], [2, 2, 6], [9, 12],
        [1, 4], [4, 10], [10, 10],
        [3, 8, 8, 11], [11],
    ]  # fmt: skip
    assert _positions(batches) == list(range(N_SAMPLES))
    assert [key[3] for batch in batches for key in batch[:1]] == list(range(8))


def test_len_counts_partial_batches() -> None:
    assert len(_sampler()) == 3 + 3 + 2
    assert len(_sampler(world_size=3)) == 3
    assert len(_sampler(world_size=3, even_batches="drop")) == 2


def test_same_seed_and_epoch_give_the_same_order() -> None:
    assert _sampler().epoch_batches(4) == _sampler().epoch_batches(4)


def test_other_epoch_or_seed_gives_another_order() -> None:
    base = _images(_sampler().epoch_batches(0))
    assert _images(_sampler().epoch_batches(1)) != base
    assert _images(_sampler(seed=8).epoch_batches(0)) != base


def test_group_order_does_not_depend_on_other_groups() -> None:
    """Group g is shuffled by its own generator: growing another bucket leaves g's order alone."""
    grown = _sampler(repeats=np.where(GROUPS == 2, REPEATS + 5, REPEATS))

    def group0(sampler: BucketBatchSampler) -> list[list[int]]:
        return sorted(
            [key[2] for key in b] for b in sampler.epoch_batches(3) if GROUPS[b[0][2]] == 0
        )

    assert group0(grown) == group0(_sampler())


def test_keys_are_plain_ints_and_batches_pickle() -> None:
    batch = _sampler(world_size=3, rank=2).epoch_batches(0)[-1]
    assert batch.padded
    assert all(type(value) is int for key in batch for value in key)
    clone = pickle.loads(pickle.dumps(batch))
    assert clone == batch
    assert clone.padded


def test_sampler_pickles_to_the_same_batches() -> None:
    sampler = _sampler(world_size=2, rank=1)
    sampler.epoch_batches(0)  # fills the layout cache, which pickling leaves out
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone._caches == {}
    assert clone.epoch_batches(2) == sampler.epoch_batches(2)


def test_empty_sampler_yields_nothing() -> None:
    sampler = _sampler(repeats=np.zeros_like(REPEATS), world_size=2)
    assert len(sampler) == 0
    assert list(sampler) == []


def test_large_dataset_builds() -> None:
    """A million images with repeats: numpy all the way (speed is measured in benchmarks/)."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    sampler = BucketBatchSampler(
        groups=rng.integers(0, 50, n),
        repeats=rng.integers(1, 4, n),
        batch_sizes=np.full(50, 8),
        seed=1,
        world_size=4,
        rank=1,
    )
    first = next(iter(sampler))
    assert len(first) == 8
    assert len(sampler) > n // 32


# --- ranks --------------------------------------------------------------------------------------


@st.composite
def _datasets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_groups = draw(st.integers(1, 4))
    n_images = draw(st.integers(0, 30))
    groups = draw(st.lists(st.integers(-1, n_groups - 1), min_size=n_images, max_size=n_images))
    repeats = draw(st.lists(st.integers(0, 3), min_size=n_images, max_size=n_images))
    sizes = draw(st.lists(st.integers(1, 5), min_size=n_groups, max_size=n_groups))
    return np.array(groups, dtype=np.int64), np.array(repeats, dtype=np.int64), np.array(sizes)


@given(
    data=_datasets(),
    world_size=st.integers(1, 4),
    policy=st.sampled_from(["pad", "drop"]),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_rank_shards_partition_the_epoch(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    world_size: int,
    policy: str,
    seed: int,
    epoch: int,
) -> None:
    groups, repeats, sizes = data
    common = {"groups": groups, "repeats": repeats, "batch_sizes": sizes, "seed": seed}
    whole = BucketBatchSampler(**common).epoch_batches(epoch)  # type: ignore[arg-type]
    truth = {key[1]: key[2] for batch in whole for key in batch}
    assert sorted(truth) == list(range(len(truth)))  # positions are unique and dense
    assert Counter(truth.values()) == _expected_counts(groups, repeats)

    shards = [
        BucketBatchSampler(**common, rank=r, world_size=world_size, even_batches=policy)  # type: ignore[arg-type]
        for r in range(world_size)
    ]
    per_rank = [s.epoch_batches(epoch) for s in shards]
    assert {len(b) for b in per_rank} == {len(shards[0])}
    real = [key for batches in per_rank for b in batches if not b.padded for key in b]
    positions = [key[1] for key in real]
    assert len(positions) == len(set(positions))  # no sample on two ranks
    # The same sample has the same key for every world size.
    assert all(truth[pos] == image for _, pos, image, _ in real)
    # Rank r takes slots r, r + world_size, ...; slot s holds global batch s, cycling when padded.
    total = len(shards[0]) * world_size
    dealt = [per_rank[s % world_size][s // world_size] for s in range(total)]
    assert [b.padded for b in dealt] == [s >= len(whole) for s in range(total)]
    # Steps count each rank's own batches, so compare keys without them.
    dealt_keys = [_unstepped(b) for b in dealt]
    whole_keys = [_unstepped(b) for b in whole]
    if policy == "pad":
        assert set(positions) == set(truth)
        assert total - len(whole) < world_size
        assert dealt_keys == [whole_keys[s % len(whole)] for s in range(total)]
    else:
        assert 0 <= len(whole) - total < world_size
        assert dealt_keys == whole_keys[:total]
    for batches, sampler in zip(per_rank, shards, strict=True):
        steps = [b[0][3] for b in batches]
        assert steps == [epoch * len(sampler) + k for k in range(len(batches))]


@pytest.mark.parametrize("policy", ["pad", "drop"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 9])
def test_all_ranks_stream_dealt_round_robin_gives_each_rank_its_shard(
    world_size: int, policy: str
) -> None:
    # What accelerate's BatchSamplerShard does to loader.batch_sampler: slot s goes to rank s % n.
    for rank in range(world_size):
        mine = _sampler(world_size=world_size, rank=rank, even_batches=policy)
        view = AllRanksBatchSampler(_sampler(world_size=world_size, rank=rank, even_batches=policy))
        assert len(view) == len(mine) * world_size
        for _ in range(2):  # both advance to the next epoch the same way
            stream = list(view)
            assert len(stream) == len(view)
            dealt = [b for s, b in enumerate(stream) if s % world_size == rank]
            expected = list(mine)
            assert dealt == expected  # keys, steps included
            assert [b.padded for b in dealt] == [b.padded for b in expected]


def test_all_ranks_stream_counts_this_ranks_batches_for_resume() -> None:
    view = AllRanksBatchSampler(_sampler(world_size=3, rank=1))
    stream = iter(view)
    for _ in range(5):  # slots 0..4: rank 1 owns slots 1 and 4
        next(stream)
    state = view.rank_sampler.state_dict()
    assert (state["epoch"], state["batches_done"]) == (0, 2)
    resumed = AllRanksBatchSampler(_sampler(world_size=3, rank=1))
    resumed.rank_sampler.load_state_dict(state)
    rest = [b for s, b in enumerate(resumed) if s % 3 == 1]
    assert rest == _sampler(world_size=3, rank=1).epoch_batches(0)[2:]


def test_padding_repeats_batches_from_the_start() -> None:
    whole = _sampler().epoch_batches(0)  # 8 batches over 3 ranks: one padded batch
    shards = [_sampler(world_size=3, rank=r).epoch_batches(0) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert _unstepped(shards[2][2]) == _unstepped(whole[0])  # same positions, so same keys
    assert shards[2][2].padded
    assert not any(b.padded for s in shards for b in s[:2])
    dealt = [_unstepped(shards[r][k]) for k in range(3) for r in range(3)]
    assert dealt[:8] == [_unstepped(b) for b in whole]


def test_padding_cycles_when_ranks_outnumber_batches() -> None:
    sampler_args = {"groups": np.array([0]), "repeats": np.array([3]), "batch_sizes": np.array([2])}
    shards = [
        BucketBatchSampler(**sampler_args, seed=1, world_size=5, rank=r).epoch_batches(0)  # type: ignore[arg-type]
        for r in range(5)
    ]
    assert [len(s) for s in shards] == [1] * 5
    assert [len(s[0]) for s in shards] == [2, 1, 2, 1, 2]
    assert [s[0].padded for s in shards] == [False, False, True, True, True]


def test_drop_yields_nothing_when_ranks_outnumber_batches() -> None:
    sampler = _sampler(world_size=9, rank=4, even_batches="drop")
    assert len(sampler) == 0
    assert list(sampler) == []


# --- epochs -------------------------------------------------------------------------------------


def test_each_iteration_runs_the_next_epoch() -> None:
    sampler = _sampler()
    for epoch in range(3):
        batches = list(sampler)
        assert batches == sampler.epoch_batches(epoch)
        assert {key[0] for b in batches for key in b} == {epoch}


def test_set_epoch_picks_the_next_iteration() -> None:
    sampler = _sampler()
    sampler.set_epoch(5)
    assert list(sampler) == sampler.epoch_batches(5)
    assert list(sampler) == sampler.epoch_batches(6)
    sampler.set_epoch(2)
    assert list(sampler) == sampler.epoch_batches(2)


def test_an_iterator_never_advanced_claims_no_epoch() -> None:
    """DataLoader with workers calls iter(batch_sampler) twice and drops the first iterator."""
    sampler = _sampler()
    iter(sampler)
    assert list(sampler) == sampler.epoch_batches(0)


def test_steps_continue_across_epochs() -> None:
    sampler = _sampler(world_size=2, rank=1)
    steps = [b[0][3] for _ in range(3) for b in sampler]
    assert steps == list(range(3 * len(sampler)))


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "rank"), [(1, 0), (3, 1)])
@pytest.mark.parametrize("done", [0, 1, 2])
def test_resume_continues_exactly(world_size: int, rank: int, done: int) -> None:
    make = functools.partial(_sampler, world_size=world_size, rank=rank)
    reference = make()
    list(reference)  # epoch 0
    uninterrupted = [list(reference) for _ in range(2)]  # epochs 1 and 2

    first = make()
    list(first)
    it = iter(first)
    for _ in range(done):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["batches_done"]) == (1, done)

    resumed = make()
    resumed.load_state_dict(state)
    assert list(resumed) == uninterrupted[0][done:]
    assert list(resumed) == uninterrupted[1]


def test_resume_with_prefetch_counts_consumed_batches() -> None:
    sampler = _sampler()
    it = iter(sampler)
    drawn = [next(it) for _ in range(5)]  # a DataLoader prefetched 5 ...
    sampler.mark_consumed()
    sampler.mark_consumed()  # ... and the loop used 2
    state = sampler.state_dict()
    assert state["batches_done"] == 2
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == sampler.epoch_batches(0)[2:]
    assert drawn == sampler.epoch_batches(0)[:5]


def test_explicit_consumed_batches_wins() -> None:
    sampler = _sampler()
    it = iter(sampler)
    for _ in range(3):
        next(it)
    assert sampler.state_dict(consumed_batches=1)["batches_done"] == 1
    assert sampler.state_dict()["batches_done"] == 3
    with pytest.raises(ValueError, match="consumed_batches"):
        sampler.state_dict(consumed_batches=99)


def test_marking_more_than_drawn_is_an_error() -> None:
    sampler = _sampler()
    with pytest.raises(ValueError, match="before any iteration"):
        sampler.mark_consumed()
    next(iter(sampler))
    sampler.mark_consumed()
    with pytest.raises(ValueError, match="cannot mark"):
        sampler.mark_consumed()


def test_finished_epoch_resumes_at_the_next() -> None:
    sampler = _sampler()
    list(sampler)
    state = sampler.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 0)
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert list(resumed) == sampler.epoch_batches(1)


def test_state_before_any_iteration_round_trips() -> None:
    fresh = _sampler()
    fresh.set_epoch(3)
    state = fresh.state_dict()
    assert (state["epoch"], state["batches_done"]) == (3, 0)
    other = _sampler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_set_epoch_keeps_the_resume_offset_only_for_the_resumed_epoch() -> None:
    state = {**_sampler().state_dict(), "epoch": 2, "batches_done": 3}
    same = _sampler()
    same.load_state_dict(state)
    same.set_epoch(2)
    assert list(same) == same.epoch_batches(2)[3:]
    other = _sampler()
    other.load_state_dict(state)
    other.set_epoch(4)
    assert list(other) == other.epoch_batches(4)


def test_state_from_another_rank_resumes_this_rank() -> None:
    rank0 = _sampler(world_size=2, rank=0)
    it = iter(rank0)
    next(it)
    rank1 = _sampler(world_size=2, rank=1)
    rank1.load_state_dict(rank0.state_dict())
    assert list(rank1) == rank1.epoch_batches(0)[1:]


@pytest.mark.parametrize(
    "change",
    [
        {"repeats": np.where(GROUPS == 1, REPEATS + 1, REPEATS)},
        {"groups": np.where(GROUPS == 2, 0, GROUPS)},
        {"batch_sizes": BATCH_SIZES + 1},
        {"seed": 8},
        {"world_size": 2},
        {"even_batches": "drop"},
        {"shuffle": False},
    ],
    ids=["repeats", "groups", "batch-sizes", "seed", "world-size", "even-batches", "shuffle"],
)
def test_resume_into_a_different_run_is_an_error(change: dict[str, object]) -> None:
    state = _sampler().state_dict()
    with pytest.raises(ValueError, match="different run"):
        _sampler(**change).load_state_dict(state)


def test_malformed_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="missing"):
        _sampler().load_state_dict({"epoch": 0})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batches_done", None, "batches_done must be a whole number"),
        ("batches_done", "3", "batches_done must be a whole number"),
        ("batches_done", 1.0, "batches_done must be a whole number"),
        ("batches_done", 10**6, "batches_done = 1000000 is outside"),
        ("epoch", True, "epoch must be a whole number"),
        ("epoch", -1, "epoch = -1 is outside"),
        ("epoch", 10**30, "is outside"),
        ("seed", "7", "different run"),
    ],
)
def test_each_state_field_is_checked(field: str, value: object, message: str) -> None:
    state = _sampler().state_dict()
    state[field] = value
    with pytest.raises(ValueError, match=message):
        _sampler().load_state_dict(state)


def test_a_state_of_another_dataset_with_the_same_layout_is_refused() -> None:
    state = _sampler(dataset_id="photos-a").state_dict()
    _sampler(dataset_id="photos-a").load_state_dict(state)
    with pytest.raises(ValueError, match="dataset 'photos-a' != 'photos-b'"):
        _sampler(dataset_id="photos-b").load_state_dict(state)


# --- DataLoader ---------------------------------------------------------------------------------


class _Keys(Dataset[tuple[int, int, int, int]]):
    """A map-style dataset whose samples are their own keys."""

    def __len__(self) -> int:
        return len(GROUPS)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        return key

    def __getitems__(
        self, keys: list[tuple[int, int, int, int]]
    ) -> list[tuple[int, int, int, int]]:
        return [self[key] for key in keys]


def _as_list(batch: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    return list(batch)


def _loader_epochs(num_workers: int) -> None:
    sampler = _sampler(world_size=2, rank=1)
    loader = DataLoader(
        _Keys(), batch_sampler=sampler, num_workers=num_workers, collate_fn=_as_list
    )
    assert len(loader) == len(sampler)
    for epoch in range(2):
        assert list(loader) == sampler.epoch_batches(epoch)


def test_dataloader_yields_the_sampler_batches() -> None:
    _loader_epochs(num_workers=0)


@pytest.mark.slow
def test_dataloader_with_workers_yields_the_same_batches() -> None:
    _loader_epochs(num_workers=2)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"repeats": REPEATS[:-1]}, "one per image"),
        ({"repeats": -REPEATS}, "repeats must be >= 0"),
        ({"groups": np.where(GROUPS == 2, 3, GROUPS)}, "group ids run from 0 to 2"),
        ({"groups": GROUPS.astype(float)}, "integers"),
        ({"batch_sizes": np.array([3, 0, 4])}, "batch size must be >= 1"),
        ({"rank": 2, "world_size": 2}, "rank must be"),
        ({"world_size": 0}, "world_size"),
        ({"even_batches": "even"}, "even_batches"),
    ],
    ids=[
        "lengths",
        "negative-repeats",
        "unknown-group",
        "float-groups",
        "zero-batch",
        "rank",
        "world",
        "policy",
    ],
)
def test_bad_arguments_are_errors(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _sampler(**change)


# --- regularisation balancing ------------------------------------------------------------------


def _sd_scripts_loop(repeats: list[int], is_reg: list[bool]) -> list[int]:
    """The rule as sd-scripts states it, one image at a time: an oracle for the vector code."""
    out = [r if not reg else 0 for r, reg in zip(repeats, is_reg, strict=True)]
    regs = [i for i, (r, reg) in enumerate(zip(repeats, is_reg, strict=True)) if reg and r > 0]
    target = sum(r for r, reg in zip(repeats, is_reg, strict=True) if not reg)
    total, first_pass = 0, True
    while regs and total < target:
        for i in regs:
            step = repeats[i] if first_pass else 1
            out[i] += step
            total += step
            if total >= target:
                break
        first_pass = False
    return out


def test_fewer_reg_samples_than_train_are_repeated_round_robin() -> None:
    repeats = np.array([10, 10, 1, 1, 2])  # 20 train samples, 4 reg samples
    is_reg = np.array([False, False, True, True, True])
    balanced, message = balance_reg_repeats(repeats, is_reg)
    # 16 more, one at a time in order: 5 full rounds of 3, then the first image once more.
    assert balanced.tolist() == [10, 10, 7, 6, 7]
    assert message is None
    assert balanced.tolist() == _sd_scripts_loop(repeats.tolist(), is_reg.tolist())


def test_more_reg_samples_than_train_leave_the_last_images_unused() -> None:
    repeats = np.array([2, 2, 2, 4, 2, 2, 2, 1])  # 5 train samples; 6 reg images of 2 repeats
    is_reg = np.array([True, True, True, False, True, True, True, False])
    balanced, message = balance_reg_repeats(repeats, is_reg)
    # Reg in order 0,1,2,4,5,6: totals 2,4,6 -> image 2 crosses 5 and keeps both repeats.
    assert balanced.tolist() == [2, 2, 2, 4, 0, 0, 0, 1]
    assert message is not None
    assert message.startswith("3 of 6 regularisation images are not used this run")
    assert "only 5 training samples" in message


def test_exactly_balanced_is_unchanged() -> None:
    repeats = np.array([3, 1, 2])
    is_reg = np.array([False, True, True])
    assert balance_reg_repeats(repeats, is_reg)[0].tolist() == [3, 1, 2]
    assert balance_reg_repeats(repeats, is_reg)[1] is None


def test_no_reg_images_change_nothing() -> None:
    repeats = np.array([3, 0, 2])
    balanced, message = balance_reg_repeats(repeats, np.zeros(3, dtype=bool))
    assert balanced.tolist() == [3, 0, 2]
    assert message is None


def test_no_train_samples_use_no_reg_images() -> None:
    balanced, message = balance_reg_repeats(np.array([0, 2, 2]), np.array([False, True, True]))
    assert balanced.tolist() == [0, 0, 0]
    assert message is not None
    assert message.startswith("2 of 2 regularisation images are not used this run: there are no")


def test_balancing_returns_a_copy() -> None:
    repeats = np.array([5, 1])
    balance_reg_repeats(repeats, np.array([False, True]))
    assert repeats.tolist() == [5, 1]


@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=25),
)
def test_balancing_matches_the_sd_scripts_loop(images: list[tuple[int, bool]]) -> None:
    repeats = [r for r, _ in images]
    is_reg = [reg for _, reg in images]
    balanced, _ = balance_reg_repeats(
        np.array(repeats, dtype=np.int64), np.array(is_reg, dtype=bool)
    )
    assert balanced.tolist() == _sd_scripts_loop(repeats, is_reg)
