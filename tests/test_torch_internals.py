"""The canary for torch's private DataLoader internals (``stoker.torch_internals``).

If a torch upgrade removes or retypes one of them, these tests fail by name. The fence itself then
degrades to plain DataLoader behaviour with one warning, which the last tests check.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from stoker import StokerWarning, torch_internals


class Squares(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return i * i


@pytest.mark.slow
def test_a_live_multiprocess_iterator_has_every_member_stoker_uses():
    loader = DataLoader(Squares(), batch_size=2, num_workers=1, multiprocessing_context="fork")
    inner = iter(loader)
    try:
        next(inner)
        assert torch_internals.missing_internals(inner) == []
        workers = torch_internals.worker_processes(inner)
        assert len(workers) == 1 and isinstance(workers[0].pid, int)
        tasks = torch_internals.outstanding_tasks(inner)
        assert isinstance(tasks, dict)
        assert all(isinstance(k, int) and isinstance(v, tuple) for k, v in tasks.items())
        assert isinstance(inner._worker_pids_set, bool)
        assert iter(inner._sampler_iter) is inner._sampler_iter  # an iterator torch draws from
        # prefetch_factor 2: two batches asked for at the start, one more after each handed out
        assert torch_internals.outstanding_batches(inner) == 2
        assert torch_internals.sent_batches(inner) == 3  # send indices 0, 1, 2
        assert torch_internals.stop_asking(inner)
        assert len(list(inner)) == 2  # only the batches already asked for arrive
        assert torch_internals.outstanding_batches(inner) == 0
        torch_internals.unwatch_worker_exits(inner)
        assert inner._worker_pids_set is False
    finally:
        torch_internals.shutdown_workers(inner)
    assert not workers[0].is_alive()


@pytest.mark.slow
def test_persistent_workers_live_in_the_loaders_iterator_field():
    loader = DataLoader(
        Squares(),
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    assert sum(len(b) for b in loader) == 8
    inner = torch_internals.persistent_iterator(loader)
    assert inner is not None and torch_internals.worker_processes(inner)
    torch_internals.shutdown_workers(inner)


def test_the_torch_in_use_is_one_stoker_was_tested_against():
    assert torch.__version__.startswith(torch_internals.TESTED_TORCH), (
        f"torch {torch.__version__} is not in TESTED_TORCH {torch_internals.TESTED_TORCH}: run "
        "this file, and if the canaries above pass, add the version (README: tested torch)"
    )


def test_a_missing_member_degrades_with_one_warning(monkeypatch):
    from torch.utils.data import dataloader

    class Changed(dataloader._MultiProcessingDataLoaderIter):  # type: ignore[misc]
        def __init__(self) -> None:  # a torch whose iterator lost its private fields
            pass

        def __del__(self) -> None:  # torch's own __del__ needs the fields this one lacks
            pass

    inner = Changed()
    with pytest.warns(StokerWarning, match="no DataLoader internal '_workers'") as caught:
        assert torch_internals.worker_processes(inner) == []
        assert torch_internals.worker_processes(inner) == []
    assert len([w for w in caught if "_workers" in str(w.message)]) == 1
    with pytest.warns(StokerWarning, match="_sampler_iter"):
        assert torch_internals.stop_asking(inner) is False
    with pytest.warns(StokerWarning, match="_task_info"):
        assert torch_internals.outstanding_tasks(inner) == {}
    with pytest.warns(StokerWarning, match="_send_idx"):
        assert torch_internals.outstanding_batches(inner) is None


def test_anything_but_torchs_iterator_is_left_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for thing in (iter([1, 2]), object(), None):
            assert torch_internals.worker_processes(thing) == []
            assert torch_internals.stop_asking(thing) is False
            assert torch_internals.outstanding_batches(thing) is None
            assert torch_internals.sent_batches(thing) == 0
            torch_internals.shutdown_workers(thing)
            torch_internals.unwatch_worker_exits(thing)


def test_new_shared_tensor_is_in_shared_memory_with_the_shape_asked_for():
    assert callable(getattr(torch.UntypedStorage, "_new_shared", None))  # the member it relies on
    tensor = torch_internals.new_shared_tensor((2, 3, 4, 5), torch.float32)
    assert tensor.is_shared() and tensor.shape == (2, 3, 4, 5) and tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    tensor.fill_(0.5)
    assert float(tensor.sum()) == 0.5 * 120


def test_dataloader_draws_from_index_sampler_which_a_subclass_can_override():
    # StokerLoader relies on this: batch_sampler shows every rank's batches, _index_sampler is
    # what the loader iterates and counts (see stoker.loader.build).
    from torch.utils.data import DataLoader

    assert isinstance(DataLoader.__dict__["_index_sampler"], property)

    class Evens(DataLoader):
        @property
        def _index_sampler(self):
            return [[0], [2]]

    loader = Evens(list(range(4)), batch_sampler=[[0], [1], [2], [3]])
    assert len(loader) == 2
    assert [int(b[0]) for b in loader] == [0, 2]


class WhoMadeIt(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Items that say which worker made them; item 4 waits until ``go`` exists."""

    def __init__(self, go: Path) -> None:
        self.go = go

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        assert info is not None
        deadline = time.monotonic() + 60
        while i == 4 and not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return i, info.id


@pytest.mark.slow
def test_batches_go_to_the_worker_with_the_least_work_and_return_in_order(tmp_path: Path):
    """Items 0 to 3 went out in turn before the switch. Item 4 costs 100 (the rest 1) and goes
    to worker 0 (a tie at 0); it cannot return before item 3 was handed out, so when item 2 is
    received worker 0 still has it outstanding and item 6 goes to worker 1, where torch's turn
    would give it to worker 0. The items come back in order all the same."""
    go = tmp_path / "go"
    loader = DataLoader(
        WhoMadeIt(go), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    inner = iter(loader)
    got = []
    try:
        assert set(torch_internals.DISPATCH_MEMBERS) <= set(dir(inner))  # the canary
        assert hasattr(inner, "_data_queue")  # read to keep more in flight (the `depth`)
        assert torch_internals.dispatch_by_work(inner, lambda i: 100.0 if i == 4 else 1.0)
        for item in inner:
            got.append(item)
            if item[0] == 3:  # items 4 to 7 were asked for: let item 4 finish
                go.touch()
    finally:
        torch_internals.shutdown_workers(inner)
    assert [i for i, _ in got] == list(range(12))  # the same items, in order
    workers = dict(got)
    assert [workers[i] for i in range(5)] == [0, 1, 0, 1, 0]
    assert workers[6] == 1
    assert not torch_internals.dispatch_by_work(iter(Squares()), len)  # not torch's iterator
    unordered = DataLoader(Squares(), num_workers=1, in_order=False, multiprocessing_context="fork")
    inner = iter(unordered)
    try:
        assert not torch_internals.dispatch_by_work(inner, len)  # its own hand-out is left alone
    finally:
        torch_internals.shutdown_workers(inner)


class LateFirst(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """24 items; item 0 waits until ``go`` exists; each item leaves a file when made."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> int:
        deadline = time.monotonic() + 60
        while i == 0 and not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (self.folder / f"made-{i}").touch()
        return i


def _made(folder: Path) -> set[int]:
    return {int(f.name.split("-")[1]) for f in folder.glob("made-*")}


def _late_first_loader(folder: Path) -> Any:
    # a timeout: a lost item fails the test instead of hanging it
    loader = DataLoader(
        LateFirst(folder),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=120,
    )
    return iter(loader)


def _await_made(folder: Path, expected: set[int], *, settle: float) -> set[int]:
    """What was made once ``expected`` is (or 30 s passed), after ``settle`` s more."""
    deadline = time.monotonic() + 30
    while _made(folder) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(settle)
    return _made(folder)


@pytest.mark.slow
@pytest.mark.parametrize("ahead", [0, 8])
def test_a_batch_ahead_of_a_late_one_asks_for_the_next_within_the_bound(tmp_path: Path, ahead: int):
    """Item 0 is late. Torch asks for 4 items (2 workers x prefetch 2) and for one more only when
    it hands one out, so without refilling the free worker makes its 2 and idles: items 1 and 3
    (item 2 queues behind item 0). With ``ahead=8`` each early arrival asks for the next, up to
    4 + 8 items asked for and not handed out: 0..11, all made but 0, 2 and 4 (torch sent 0..3
    in turn, with no cost recorded, so item 4 goes to worker 0 at a tie). Then the late item
    comes and every item is handed out once, in order."""
    inner = _late_first_loader(tmp_path)
    expected = {1, 3} if ahead == 0 else set(range(1, 12)) - {2, 4}
    seen: list[set[int]] = []

    def release_the_late_item() -> None:  # the loop waits in next() for item 0 meanwhile
        # room for any item beyond the bound to be made (none may be)
        seen.append(_await_made(tmp_path, expected, settle=0.3))
        (tmp_path / "go").touch()

    release = threading.Thread(target=release_the_late_item)
    try:
        assert torch_internals.dispatch_by_work(inner, lambda i: 1.0, ahead=ahead)
        release.start()
        assert list(inner) == list(range(24))
    finally:
        release.join()
        torch_internals.shutdown_workers(inner)
    assert seen == [expected]


@pytest.mark.slow
@pytest.mark.parametrize(("depth", "made"), [(None, 5), (8, 9)])
def test_each_hand_out_tops_the_workers_up_to_the_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth, made: int
):
    """A loop that takes item 0 once items 0..3 are made, and then trains (it does not ask):
    torch asked for 2 workers x prefetch 2 items and asks for one more per item handed out, so
    items 0..4 are made. With ``depth=8``, as items 1..3 wait in the queue unread, the hand-out
    tops the workers up to 8 asked for and not received: 0..8."""
    (tmp_path / "go").touch()
    inner = _late_first_loader(tmp_path)
    # whether items 1..3 reached the queue by the hand-out is timing: said here, tested below
    monkeypatch.setattr(torch_internals, "_waiting", lambda inner: True)
    try:
        assert torch_internals.dispatch_by_work(inner, lambda i: 1.0, depth=depth, ahead=0)
        _await_made(tmp_path, set(range(4)), settle=0.2)  # room for them to reach the queue
        assert next(inner) == 0
        # room for any item beyond the depth to be made (none may be)
        assert _await_made(tmp_path, set(range(made)), settle=0.3) == set(range(made))
        assert list(inner) == list(range(1, 24))
    finally:
        torch_internals.shutdown_workers(inner)


@pytest.mark.slow
def test_no_batch_is_asked_for_while_persistent_workers_restart(tmp_path: Path):
    """At an epoch's start torch reads the persistent workers' replies through ``_get_data``
    and drops anything else; a batch asked for then would be lost and the loop would wait for
    it forever. Only batches of the running iteration ask for more."""
    loader = DataLoader(
        Squares(),
        batch_size=1,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
        timeout=60,  # a lost batch fails the test instead of hanging it
    )
    inner = iter(loader)
    assert torch_internals.dispatch_by_work(inner, len)
    asked_for_while_reading: list[object] = []
    refilling = inner._get_data
    queues = inner._index_queues
    puts = [q.put for q in queues]
    reading = False

    def watched(i: int):
        def put(item: object, *args: object, **kwargs: object) -> None:
            if reading:
                asked_for_while_reading.append(item)
            puts[i](item, *args, **kwargs)

        return put

    for i, q in enumerate(queues):
        q.put = watched(i)

    def read() -> object:
        nonlocal reading
        reading = True
        try:
            got = refilling()
        finally:
            reading = False
        if not isinstance(got[0], int):  # a restart reply: nothing may have been asked for
            assert asked_for_while_reading == [], got
        asked_for_while_reading.clear()
        return got

    inner._get_data = read
    try:
        for _ in range(3):
            assert [int(x) for x in iter(loader)] == [i * i for i in range(8)]
    finally:
        torch_internals.shutdown_workers(inner)


class SlowAt(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """16 items, each its own index; item ``slow`` takes half a second."""

    def __init__(self, slow: int) -> None:
        self.slow = slow

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> int:
        if i == self.slow:
            time.sleep(0.5)
        return i

    def persistent_loader(self) -> DataLoader[int]:
        """Two persistent forked workers, items one at a time; a lost item fails the test
        after a minute instead of hanging it."""
        return DataLoader(
            self,
            batch_size=None,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context="fork",
            timeout=60,
        )


@pytest.mark.slow
def test_batches_torch_drops_unseen_are_handed_to_dropped_once_each():
    """The loop takes items 0, 1 and 2 (item 2 is slow, so items after it arrive first and wait
    in torch's ``_task_info``), then starts the next epoch of the persistent workers. Torch's
    ``_reset`` forgets the waiting items and reads and drops those still on their way; each of
    them reaches ``dropped`` exactly once, and the new epoch is whole."""
    loader = SlowAt(2).persistent_loader()
    inner = iter(loader)
    dropped: list[int] = []
    try:
        assert torch_internals.dispatch_by_work(inner, lambda i: 1.0, dropped=dropped.append)
        assert [int(next(inner)) for _ in range(3)] == [0, 1, 2]
        waiting = sorted(k for k, info in inner._task_info.items() if len(info) == 2)
        sent = inner._send_idx
        assert waiting  # arrived before item 2 and never handed out
        assert [int(x) for x in iter(loader)] == list(range(16))
    finally:
        torch_internals.shutdown_workers(inner)
    assert sorted(int(x) for x in dropped) == list(range(3, sent))  # each once, none missing
    assert set(waiting) < {int(x) for x in dropped}  # and some were still on their way

    # a failing `dropped` is logged, not raised: torch's _reset must finish
    def broken(batch: object) -> None:
        raise ValueError("broken")

    again = SlowAt(2).persistent_loader()
    inner = iter(again)
    try:
        assert torch_internals.dispatch_by_work(inner, lambda i: 1.0, dropped=broken)
        assert [int(next(inner)) for _ in range(3)] == [0, 1, 2]
        assert [int(x) for x in iter(again)] == list(range(16))
    finally:
        torch_internals.shutdown_workers(inner)


@pytest.mark.slow
def test_the_least_work_hand_out_does_not_keep_the_iterator_alive():
    """A loop that drops the iterator (an interrupted epoch) stops its workers at once."""
    import weakref

    inner = iter(DataLoader(Squares(), batch_size=2, num_workers=1, multiprocessing_context="fork"))
    assert torch_internals.dispatch_by_work(inner, len)
    next(inner)
    workers = torch_internals.worker_processes(inner)
    alive = weakref.ref(inner)
    del inner
    assert alive() is None  # freed by reference counting, not left for the garbage collector
    workers[0].join(timeout=10)
    assert not workers[0].is_alive()


def test_batches_wait_unread_only_when_the_queue_holds_one() -> None:
    """`_waiting` reads the iterator's queue: empty, holding a batch, closed (shutting down)."""
    import queue

    class Inner:
        _data_queue: Any = queue.Queue()

    inner = Inner()
    assert not torch_internals._waiting(inner)
    inner._data_queue.put((0, "batch"))
    assert torch_internals._waiting(inner)

    class Closed:
        def empty(self) -> bool:
            raise OSError("handle is closed")

    inner._data_queue = Closed()
    assert not torch_internals._waiting(inner)
