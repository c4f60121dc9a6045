"""Reused batch memory (stoker.data.buffers): a block is lent again only when nothing reaches it."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stoker
from stoker import torch_internals
from stoker.data import buffers as buffers_module
from stoker.data.buffers import MIN_BYTES, ArrivedBlocks, BatchBuffers, SharedBlocks

SHAPE = (2, 3, 256, 512)  # 3 MiB of float32: above MIN_BYTES


def test_a_dropped_batch_gives_its_memory_to_the_next() -> None:
    pool = BatchBuffers()
    first = pool.empty(SHAPE, torch.float32)
    address = first.data_ptr()
    del first
    second = pool.empty(SHAPE, torch.float32)
    assert second.data_ptr() == address
    assert second.shape == SHAPE and second.dtype == torch.float32 and second.is_contiguous()
    assert second.untyped_storage().nbytes() == second.numel() * 4  # exactly the batch, no more
    assert pool.kept_bytes() == second.numel() * 4


def holders(batch: torch.Tensor) -> dict[str, Any]:
    """Each way a caller can keep a batch's memory without keeping the batch itself."""
    return {
        "view": batch[0],
        "numpy": batch.numpy(),
        "storage": batch.untyped_storage(),
        "flat": batch.view(-1),
        "dlpack": torch.utils.dlpack.to_dlpack(batch),
        "memoryview": memoryview(batch.numpy()),
    }


@pytest.mark.parametrize("way", list(holders(torch.zeros(1))))
def test_memory_that_anything_still_reaches_is_not_lent_again(way: str) -> None:
    pool = BatchBuffers()
    batch = pool.empty(SHAPE, torch.float32)
    batch.fill_(7.0)
    kept = holders(batch)[way]
    address = batch.data_ptr()
    del batch
    gc.collect()
    other = pool.empty(SHAPE, torch.float32)
    other.fill_(-1.0)
    assert other.data_ptr() != address
    assert pool.kept_bytes() == 2 * other.numel() * 4
    if way == "dlpack":
        values = torch.utils.dlpack.from_dlpack(kept).numpy()
    elif way == "storage":
        values = np.frombuffer(bytes(kept), np.float32)
    elif isinstance(kept, torch.Tensor):
        values = kept.numpy()
    else:
        values = np.asarray(kept)
    assert np.all(values == 7.0)  # the held batch kept its values


def test_at_most_blocks_are_kept_then_memory_is_ordinary() -> None:
    pool = BatchBuffers(blocks=2)
    held = [pool.empty(SHAPE, torch.float32) for _ in range(3)]
    assert pool.kept_bytes() == 2 * held[0].numel() * 4  # the third is ordinary memory
    assert len({t.data_ptr() for t in held}) == 3
    small = pool.empty((4, 4), torch.float32)
    assert small.numel() * 4 < MIN_BYTES and pool.kept_bytes() == 2 * held[0].numel() * 4


def test_a_smaller_batch_uses_a_larger_block_and_a_larger_one_grows_it() -> None:
    pool = BatchBuffers(blocks=1)
    big = pool.empty(SHAPE, torch.float32)
    address = big.data_ptr()
    del big
    small = pool.empty((2, 3, 256, 256), torch.uint8)  # 384 KiB < MIN_BYTES: ordinary memory
    assert pool.kept_bytes() == int(np.prod(SHAPE)) * 4
    half = pool.empty((1, 3, 256, 512), torch.float32)
    assert half.data_ptr() == address and half.untyped_storage().nbytes() == half.numel() * 4
    del half, small
    larger = pool.empty((4, 3, 256, 512), torch.float32)
    assert pool.kept_bytes() == larger.numel() * 4  # replaced by one that fits
    del larger
    pool.clear()
    assert pool.kept_bytes() == 0


def test_the_pool_pickles_empty() -> None:
    pool = BatchBuffers(blocks=3)
    batch = pool.empty(SHAPE, torch.float32)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.blocks == 3 and copy.kept_bytes() == 0 and pool.kept_bytes() > 0
    assert batch.numel() > 0


def write_images(root: Path, count: int) -> None:
    folder = root / "1_set"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        size = ((640, 480), (480, 640), (512, 512))[i % 3]
        pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"{i}.jpg", quality=90)
        (folder / f"{i}.txt").write_text("a photo\n", encoding="utf-8")


@pytest.mark.slow
def test_batches_kept_by_the_loop_keep_their_values(tmp_path: Path) -> None:
    """Every batch of an epoch held at once equals the same batch hashed and dropped at once."""
    write_images(tmp_path, 12)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    loader = stoker.make_loader(ds, seed=1, shuffle=True, workers=0, monitor=False)
    one_at_a_time = [batch["images"].clone() for batch in loader]
    assert ds.buffers.kept_bytes() > 0  # the batches did come from reused memory
    loader.set_epoch(0)  # the same epoch again
    all_at_once = list(loader)
    assert len(all_at_once) == len(one_at_a_time) == 6
    for kept, expected in zip(all_at_once, one_at_a_time, strict=True):
        assert torch.equal(kept["images"], expected)
    ordinary = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    ordinary.buffers = BatchBuffers(blocks=0)  # every batch in fresh memory, as before
    fresh = stoker.make_loader(ordinary, seed=1, shuffle=True, workers=0, monitor=False)
    assert all(
        torch.equal(batch["images"], expected)
        for batch, expected in zip(fresh, one_at_a_time, strict=True)
    )
    assert ordinary.buffers.kept_bytes() == 0


# --- a worker's shared-memory blocks -------------------------------------------------------------

BYTES = (4, 3, 256, 512)  # 1.5 MiB of uint8


@pytest.mark.skipif(not buffers_module._ORDERED_STORES, reason="blocks are reused on x86-64 only")
def test_a_shared_block_is_written_again_only_after_it_was_given_back() -> None:
    blocks = SharedBlocks(blocks=2)
    arrived = ArrivedBlocks()
    first = blocks.empty(BYTES, torch.uint8)
    assert first.is_shared() and first.shape == BYTES and first.is_contiguous()
    second = blocks.empty(BYTES, torch.uint8)
    assert second.data_ptr() != first.data_ptr()  # the first was not given back
    third = blocks.empty(BYTES, torch.uint8)  # both blocks lent: a fresh segment
    assert third.is_shared() and third.data_ptr() not in (first.data_ptr(), second.data_ptr())
    assert not arrived.give_back(third)  # not a block: nothing is written
    assert not arrived.give_back(torch.zeros(BYTES, dtype=torch.uint8))
    assert arrived.give_back(first)
    again = blocks.empty((3, 3, 256, 512), torch.uint8)  # smaller: the given-back block
    assert again.data_ptr() == first.data_ptr()
    assert not arrived.give_back(first[1:])  # a view that does not start the block
    assert blocks.empty(BYTES, torch.uint8).data_ptr() not in (first.data_ptr(), second.data_ptr())


@pytest.mark.skipif(not buffers_module._ORDERED_STORES, reason="blocks are reused on x86-64 only")
def test_blocks_nobody_gives_back_are_dropped() -> None:
    """With pin_memory the loop receives pinned copies and never gives a block back."""
    blocks = SharedBlocks(blocks=2)
    lent = [blocks.empty(BYTES, torch.uint8) for _ in range(2 + 2 * 2)]
    assert all(t.is_shared() for t in lent)
    assert blocks._kept == [] and blocks.blocks == 0
    assert blocks.empty(BYTES, torch.uint8).is_shared()  # fresh segments from now on
    given = SharedBlocks(blocks=1)
    first = given.empty(BYTES, torch.uint8)
    assert ArrivedBlocks().give_back(first)
    held = given.empty(BYTES, torch.uint8)
    for _ in range(4):
        given.empty(BYTES, torch.uint8)  # the one block is lent: fresh ones
    assert len(given._kept) == 1 and held.data_ptr() == first.data_ptr()


@pytest.mark.skipif(not buffers_module._ORDERED_STORES, reason="blocks are reused on x86-64 only")
def test_a_full_dev_shm_stops_new_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = SharedBlocks(blocks=4)
    kept = blocks.empty(BYTES, torch.uint8)
    fresh = torch_internals.new_shared_tensor

    def full(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if shape == (len(kept.untyped_storage()),):  # a new block
            raise RuntimeError("unable to allocate shared memory")
        return fresh(shape, dtype)

    monkeypatch.setattr(torch_internals, "new_shared_tensor", full)
    other = blocks.empty(BYTES, torch.uint8)  # no block: a fresh segment, as before the blocks
    assert other.is_shared() and other.untyped_storage().nbytes() == other.nbytes
    assert blocks.blocks == 1 and len(blocks._kept) == 1


def test_shared_blocks_pickle_empty_and_size_blocks_for_the_largest_batch() -> None:
    blocks = SharedBlocks(blocks=3, block_bytes=5 << 20)
    blocks.empty(BYTES, torch.uint8)
    copy = pickle.loads(pickle.dumps(blocks))
    assert (copy.blocks, copy.block_bytes, copy._kept) == (3, 5 << 20, [])
    if buffers_module._ORDERED_STORES:
        assert blocks._kept[0].capacity >= 5 << 20
    arrived = pickle.loads(pickle.dumps(ArrivedBlocks(keep=5)))
    assert arrived.keep == 5 and arrived._mapped == []


def test_batches_ahead_of_their_turn_only_with_room_in_dev_shm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches that wait ahead of their turn (`torch_internals.AHEAD_ROUNDS`), those kept in
    flight beyond torch's (`torch_internals.IN_FLIGHT`) and the workers' spare blocks for them
    need room in /dev/shm twice over; on a container's default 64 MiB
    for these 48 MiB batches there is none, so neither is taken. With pinning no block comes
    back, so none is kept at all; the main process keeps every worker's blocks mapped."""
    import dataclasses

    from stoker.loader import build as build_module
    from stoker.loader.build import build_loader
    from stoker.plan import LoaderRequest
    from stoker.planning import plan_request

    write_images(tmp_path, 2)
    ds = stoker.load_dataset(tmp_path, resolution=2048, batch_size=2, progress=None)
    batch = ds.for_workers().transit_batch_bytes
    assert batch == 2 * 2048 * 2048 * 3  # two uint8 images in the largest bucket
    plan = plan_request(LoaderRequest(workers=2), budget=2, warn=False)
    plain = dataclasses.replace(plan, pin_memory=False)
    rounds = torch_internals.AHEAD_ROUNDS

    def built(free: int, **changes: Any) -> Any:
        monkeypatch.setattr(build_module, "shm_free_bytes", lambda: free)
        return build_loader(ds, dataclasses.replace(plain, **changes), seed=0, monitor=False)

    roomy = built(1 << 40)
    assert roomy._ahead_rounds == rounds
    assert roomy.in_flight == torch_internals.IN_FLIGHT
    # each of the 2 workers' share of the batches kept in flight beyond torch's 2 x 2
    deeper = -(-(torch_internals.IN_FLIGHT - 4) // 2)
    assert roomy.dataset.shared_blocks.blocks == buffers_module.DEFAULT_BLOCKS + rounds * 2 + deeper
    assert roomy.dataset.arrived.keep >= 3 * roomy.dataset.shared_blocks.blocks
    docker = built(64 << 20)
    assert docker._ahead_rounds == 0 and docker.in_flight == 0
    assert docker.dataset.shared_blocks.blocks == buffers_module.DEFAULT_BLOCKS
    # a prefetch_factor the user gave is the depth: nothing deeper is kept in flight
    given = built(1 << 40, request=LoaderRequest(workers=2, prefetch_factor=2))
    assert given._ahead_rounds == rounds and given.in_flight == 0
    assert given.dataset.shared_blocks.blocks == buffers_module.DEFAULT_BLOCKS + rounds * 2
    pinned = built(1 << 40, pin_memory=True)
    assert pinned._ahead_rounds == rounds
    # no block would come back from pinned copies: none at all, and none counted as memory
    assert pinned.dataset.shared_blocks.blocks == 0 and pinned.dataset.transit_block_bytes == 0


@pytest.mark.slow
def test_workers_reusing_blocks_send_the_same_batches(tmp_path: Path) -> None:
    """Three epochs through two persistent workers that write batches into given-back blocks
    equal the same epochs made in the main process."""
    write_images(tmp_path, 12)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)

    def epochs(workers: int) -> tuple[Any, list[torch.Tensor]]:
        loader = stoker.make_loader(
            ds, seed=2, shuffle=True, workers=workers, persistent=workers > 0, monitor=False
        )
        return loader, [batch["images"] for _ in range(3) for batch in loader]

    _, expected = epochs(0)
    loader, got = epochs(2)
    assert len(got) == len(expected) == 18
    assert all(map(torch.equal, got, expected))
    if buffers_module._ORDERED_STORES:
        assert loader.dataset.arrived._mapped  # batches did come in given-back blocks


@pytest.mark.slow
@pytest.mark.skipif(not buffers_module._ORDERED_STORES, reason="blocks are reused on x86-64 only")
def test_batches_dropped_after_a_loop_left_early_give_their_blocks_back(tmp_path: Path) -> None:
    """Persistent workers and a loop that takes two batches of each epoch and leaves: at the
    next epoch's start torch drops, unseen, the batches already asked for. Their blocks go back
    to their workers (`StokerDataset.drop`), so after eight such epochs every batch still comes
    in a block; without that, the workers' blocks all stayed lent after two or three epochs and
    every later batch came in a fresh segment."""
    write_images(tmp_path, 24)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    loader = stoker.make_loader(ds, seed=2, shuffle=True, workers=2, persistent=True, monitor=False)
    arrived = loader.dataset.arrived
    in_blocks: list[bool] = []
    give_back = arrived.give_back

    def recorded(tensor: torch.Tensor) -> bool:
        in_blocks.append(give_back(tensor))
        return in_blocks[-1]

    arrived.give_back = recorded  # type: ignore[method-assign]
    for _ in range(8):
        for taken, _batch in enumerate(loader, 1):
            if taken == 2:
                break
    dropped = len(in_blocks) - 8 * 2  # give-backs besides the batches the loop took
    assert dropped > 0  # the early ask had batches on their way each time the loop left
    in_blocks.clear()
    batches = sum(1 for _batch in loader)
    assert batches == len(loader) and len(in_blocks) >= batches and all(in_blocks)


# --- float batches lent to the loop in their blocks ------------------------------------------------


@pytest.mark.skipif(not buffers_module._ORDERED_STORES, reason="blocks are reused on x86-64 only")
def test_a_lent_block_goes_back_when_nothing_reaches_the_lent_tensor() -> None:
    blocks = SharedBlocks(blocks=1)
    arrived = ArrivedBlocks()
    sent = blocks.empty(SHAPE, torch.float32)
    sent.copy_(torch.arange(sent.numel(), dtype=torch.float32).reshape(SHAPE))
    lent = arrived.lend(sent)
    assert lent is not None and lent.dtype == torch.float32 and lent.shape == SHAPE
    assert lent.data_ptr() == sent.data_ptr() and torch.equal(lent, sent)
    assert arrived.lend(torch.zeros(SHAPE)) is None  # not a block: nothing lent
    del sent  # the loop holds only what it was lent
    part = lent[1]
    del lent
    gc.collect()
    assert arrived.lent() == 1  # a view of the lent tensor still reaches the block
    assert blocks.empty(SHAPE, torch.float32).data_ptr() != part.data_ptr()  # a fresh segment
    expected = torch.arange(part.numel(), dtype=torch.float32) + part.numel()
    assert torch.equal(part.flatten(), expected)  # untouched
    del part
    gc.collect()
    assert arrived.lent() == 0
    again = blocks.empty(SHAPE, torch.float32)
    assert again.data_ptr() == blocks._kept[0].storage.data_ptr()  # the block, given back


def _batches_held_and_dropped(tmp_path: Path, transit: str) -> None:
    """Batches of three epochs through two persistent workers, all held at once and then drawn
    and dropped one at a time, against the same epochs made in the main process."""
    write_images(tmp_path, 12)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    ds.float_transit = transit  # type: ignore[assignment]
    in_process = stoker.make_loader(ds, seed=2, shuffle=True, workers=0, monitor=False)
    expected = [batch["images"].clone() for _ in range(3) for batch in in_process]
    held = stoker.make_loader(ds, seed=2, shuffle=True, workers=2, persistent=True, monitor=False)
    kept = [batch["images"] for _ in range(3) for batch in held]
    assert len(kept) == len(expected) == 18  # more than the blocks of both workers
    assert all(map(torch.equal, kept, expected))  # no held batch was written over
    blocks = held.dataset.float_in_blocks
    assert blocks == (transit == "blocks" and buffers_module.reused_shared_blocks())
    del kept
    gc.collect()
    dropped = stoker.make_loader(
        ds, seed=2, shuffle=True, workers=2, persistent=True, monitor=False
    )
    addresses = set()
    for i, batch in enumerate(batch for _ in range(3) for batch in dropped):
        assert torch.equal(batch["images"], expected[i])
        addresses.add(batch["images"].data_ptr())
    if blocks:  # given back on the tensors' death and written again: the two workers' rings
        assert len(addresses) <= 2 * buffers_module.FLOAT_BLOCKS < 18
        assert dropped.dataset.arrived.lent() <= 1  # only the last batch is still reachable


@pytest.mark.slow
@pytest.mark.parametrize("transit", ["blocks", "uint8"])
def test_float_batches_in_blocks_equal_and_stay_intact(tmp_path: Path, transit: str) -> None:
    _batches_held_and_dropped(tmp_path, transit)


def test_float_blocks_fall_back_to_uint8_without_room_or_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path, 2)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    assert ds.float_transit == "uint8" and not ds.for_workers().float_in_blocks  # the default
    ds.float_transit = "blocks"
    if buffers_module._ORDERED_STORES:
        assert ds.for_workers().float_in_blocks
        twin = ds.for_workers()
        largest = twin._largest_batch_bytes()  # uint8; a float block holds 4 bytes a value
        assert twin.transit_block_bytes == buffers_module.FLOAT_BLOCKS * 4 * largest
    monkeypatch.setattr(buffers_module, "shm_free_bytes", lambda: 64 << 20)  # docker's default
    twin = ds.for_workers()
    assert twin.uint8_in_transit and not twin.float_in_blocks
    # the uint8 blocks (the largest uint8 batch each) count as the workers' memory too
    assert twin.transit_block_bytes == twin.shared_blocks.blocks * twin._largest_batch_bytes() > 0
    monkeypatch.undo()
    monkeypatch.setattr(buffers_module, "_ORDERED_STORES", False)  # e.g. aarch64
    twin = ds.for_workers()
    assert twin.uint8_in_transit and not twin.float_in_blocks
    assert ds.for_workers().arrive(ds[0]) is not None


def test_pinned_batches_cross_as_uint8(tmp_path: Path) -> None:
    """torch's pin thread copies a batch before `arrive` sees it, so lent blocks would never
    come back: with pin_memory the loader's workers send uint8 (no CUDA here: the loader is
    built, not iterated)."""
    import dataclasses

    from stoker.loader.build import build_loader
    from stoker.plan import LoaderRequest
    from stoker.planning import plan_request

    write_images(tmp_path, 2)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    ds.float_transit = "blocks"
    plan = plan_request(LoaderRequest(workers=2), budget=2, warn=False)
    plain = build_loader(ds, dataclasses.replace(plan, pin_memory=False), seed=0, monitor=False)
    pinned = build_loader(ds, dataclasses.replace(plan, pin_memory=True), seed=0, monitor=False)
    assert plain.dataset.float_in_blocks == ds.for_workers().float_in_blocks
    assert pinned.dataset.uint8_in_transit and not pinned.dataset.float_in_blocks
    assert pinned.pin_memory and ds.float_transit == "blocks"  # the user's dataset is unchanged


@pytest.mark.slow
def test_least_work_dispatch_sends_the_same_batches(tmp_path: Path) -> None:
    """Batches handed to the worker with the least work (`StokerDataset.dispatch`) are the same
    batches, in the same order, as those made in the main process, over three epochs."""
    write_images(tmp_path, 12)
    ds = stoker.load_dataset(tmp_path, resolution=512, batch_size=2, progress=None)
    in_process = stoker.make_loader(ds, seed=4, shuffle=True, workers=0, monitor=False)
    expected = [batch for _ in range(3) for batch in in_process]
    ds.dispatch = "least work"  # type: ignore[assignment]
    keys = [tuple(k) for k in next(iter(ds.make_batch_sampler(seed=0, shuffle=False)))]
    assert ds.batch_cost(keys) == sum(
        float(ds.catalog.widths[k[2]]) * float(ds.catalog.heights[k[2]]) + 1e6 for k in keys
    )
    loader = stoker.make_loader(ds, seed=4, shuffle=True, workers=2, persistent=True, monitor=False)
    got = []
    for _ in range(3):
        for batch in loader:
            got.append(batch)
            assert getattr(loader._live(), "_stoker_dispatch", False)
    assert len(got) == len(expected) == 18
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["image_keys"] == theirs["image_keys"]
        assert torch.equal(mine["images"], theirs["images"])
        assert torch.equal(mine["crop_top_lefts"], theirs["crop_top_lefts"])
