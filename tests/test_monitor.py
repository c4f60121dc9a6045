from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from stoker import InputMonitor, LoaderStats, Problem, StokerWarning, make_loader


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(monitor: InputMonitor, clock: FakeClock, batches: int, *, wait: float, step: float):
    """Record ``batches`` batches; returns the 1-based batch numbers at which it said 'warn'."""
    fired = []
    for i in range(batches):
        asked = clock.now
        clock.now += wait
        if monitor.record(asked, clock.now, 4):
            fired.append(i + 1)
        clock.now += step
    return fired


def test_warns_once_when_the_window_fills_above_the_threshold():
    clock = FakeClock()
    monitor = InputMonitor(clock=clock, window_seconds=0)
    # waiting 0.05 s of every 0.15 s: a third of the time
    fired = feed(monitor, clock, 200, wait=0.05, step=0.1)
    assert fired == [5 + 50]  # not during warm-up, not before the window is full, only once
    stats = monitor.stats(workers=2)
    assert stats.warned and stats.batches == 200 and stats.samples == 800
    # the first batch has no step before it
    assert stats.wait_fraction == pytest.approx(200 * 0.05 / (200 * 0.05 + 199 * 0.1))
    assert stats.window_wait_fraction == pytest.approx(1 / 3)
    assert stats.consumer_batches_per_second == pytest.approx(10.0)
    assert stats.errors_by_worker == (0, 0)


def test_the_window_also_spans_window_seconds():
    clock = FakeClock()
    monitor = InputMonitor(clock=clock)  # 50 batches and 10 s
    fired = feed(monitor, clock, 200, wait=0.05, step=0.1)
    assert fired == [5 + 67]  # 67 batches of 0.15 s are the first to span 10 s
    assert len(monitor._window) == 67


def test_no_warning_below_the_threshold_or_without_training_work():
    clock = FakeClock()
    assert feed(InputMonitor(clock=clock), clock, 200, wait=0.01, step=0.1) == []
    # a loop that does nothing per batch (a benchmark, a dataset check) always waits
    assert feed(InputMonitor(clock=clock), clock, 200, wait=0.01, step=0.00001) == []


def test_warm_up_restarts_each_epoch():
    clock = FakeClock()
    monitor = InputMonitor(clock=clock, window_batches=10, window_seconds=0, warmup_batches=5)
    for _ in range(3):  # epochs of 12 batches: only 7 per epoch count, and they accumulate
        monitor.start_epoch()
        fired = feed(monitor, clock, 12, wait=1.0, step=0.1)
        if fired:
            break
    assert fired == [8]  # epoch 2: 7 counted in epoch 1, then batch 5 + 3 of epoch 2


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="threshold between 0 and 1"):
        InputMonitor(threshold=1.5)


class Ticking(Dataset):
    """Each sample costs 0.05 s of fake time to load."""

    def __init__(self, clock: FakeClock, n: int = 400) -> None:
        self.clock, self.n = clock, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self.clock.now += 0.05
        return torch.tensor(index)


def test_loader_records_waits_and_warns_once_at_the_users_line():
    clock = FakeClock()
    loader = make_loader(
        Ticking(clock), batch_size=1, workers=0, budget=4, monitor=InputMonitor(clock=clock)
    )  # 400 batches of 0.15 s: the default window (50 batches, 10 s) fills
    with pytest.warns(StokerWarning, match=r"waited for data 33% of the time") as record:
        for _ in loader:
            clock.now += 0.1  # the training step
    assert len(record) == 1 and record[0].filename == __file__
    message = str(record[0].message)
    assert "more workers (workers=4" in message and "cache_latents" in message
    stats = loader.stats()
    assert isinstance(stats, LoaderStats) and stats.batches == 400 and stats.workers == 0
    assert stats.wait_seconds == pytest.approx(400 * 0.05)
    assert stats.batches_per_second == pytest.approx(1 / 0.15, rel=0.01)


def test_stats_need_monitoring():
    loader = make_loader(range(4), workers=0, budget=1, monitor=False)
    assert list(loader)
    with pytest.raises(ValueError, match="monitor=False"):
        loader.stats()


class Replacing(Dataset):
    """Batches that report a replaced file, as stoker datasets do after a decode failure."""

    def __init__(self) -> None:
        self.decode_problems = []

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        bad = Problem(path=f"bad{index}.jpg", reason="truncated", stage="decode", action="replaced")
        return {"x": torch.tensor([index]), "replaced": [bad]}


def test_stats_count_replaced_files_per_worker():
    dataset = Replacing()
    loader = make_loader(dataset, batch_size=None, workers=0, budget=1)
    with pytest.warns(StokerWarning, match="could not decode bad"):
        list(loader)
    stats = loader.stats()
    assert stats.errors_by_worker == (3,)
    assert [p.path for p in stats.decode_problems] == ["bad0.jpg", "bad1.jpg", "bad2.jpg"]


def test_the_input_bound_warning_has_its_own_class_and_never_fails_the_suite():
    from stoker import InputBoundWarning
    from stoker.warn import warn

    assert issubclass(InputBoundWarning, StokerWarning)
    with pytest.warns(InputBoundWarning, match="waited"):
        warn("training waited for data 90% of the time", once=False, category=InputBoundWarning)
    # pyproject's filterwarnings ignores it: a loaded machine cannot turn it into a failure
    warn("training waited for data 90% on a busy machine", once=False, category=InputBoundWarning)
