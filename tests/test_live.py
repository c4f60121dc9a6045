"""Live tuning on real loaders: switches mid-epoch and at epoch boundaries leave every batch as a
fixed-count run's, resume exactly, and show in ``stats()``; the remembered choice is reused."""

from __future__ import annotations

import json

import pytest
import torch

import stoker
from conformance import _fingerprint, assert_deterministic_and_resumable, run_epochs
from stoker import load_dataset, make_loader, torch_internals
from stoker.autotune import Decision, LiveTuner
from stoker.autotune.driver import LiveTuning, live_plan
from stoker.data.synthetic import write_sample_dataset
from stoker.loader.failures import _what_workers_loaded
from stoker.planning import plan_request


@pytest.fixture
def dataset(tmp_path):
    # small, so a run of several epochs takes a second or two on a busy 2-CPU machine
    sample = write_sample_dataset(tmp_path / "s", images=8, resolution=256)
    text = sample.config.read_text().replace(
        "shuffle_caption = true", "shuffle_caption = true\nflip_aug = true\nrandom_crop = true"
    )
    text = text.replace("num_repeats = 10", "num_repeats = 2")
    sample.config.write_text(text)
    return load_dataset(sample.config)


class Scripted(LiveTuner):
    """Switches where a script says, whatever the timings: ``{(epoch, batches_done): workers}``,
    checked after each batch handed out (``(e, len)`` is an epoch's last batch)."""

    def __init__(self, loader, script: dict[tuple[int, int], int], start: int) -> None:
        super().__init__(start=start, candidates=[0, 1, 2])
        self.loader, self.script = loader, dict(script)

    def observe(self, wait_seconds, step_seconds, work, **_):
        sampler = self.loader.rank_sampler
        epoch, done = sampler._current, sampler._consumed
        to = self.script.pop((epoch, done), None)
        if to is None:
            return None
        self.decision = Decision(
            workers=to, switch=True, settled=False, reason=f"scripted at {epoch}:{done}"
        )
        return self.decision


def scripted_loader(ds, script, *, seed, start, in_flight=0):
    """A loader that starts with ``start`` workers and switches as ``script`` says. With torch's
    depth by default (``in_flight=0``): a switch waits for the batches already asked for, and
    the scripts' positions are written for 2 per worker."""
    loader = make_loader(ds, seed=seed, shuffle=True, workers=start, budget=2)
    if not in_flight:
        loader.in_flight = 0
    request = stoker.LoaderRequest(workers="auto")
    tuner = Scripted(loader, script, start)
    plan_for = lambda fixed: plan_request(fixed, budget=2, warn=False)  # noqa: E731
    loader._tuning = LiveTuning(tuner=tuner, request=request, plan_for=plan_for)
    loader.plan = live_plan(request, start, tuner.decision, plan_for)
    return loader


def scripts(per_epoch):
    return {
        # mid-epoch both ways, then at the boundary (decided on epoch 0's last batch)
        "mid": ({(0, 3): 2, (0, 7): 0, (1, 2): 1}, 1),
        "boundary": ({(0, per_epoch): 2, (1, per_epoch): 0}, 1),
        # right after a switch, before the first window: switch again
        "twice": ({(0, 1): 2, (0, 2): 1, (1, 4): 0}, 0),
    }


@pytest.mark.slow
def test_switching_runs_give_the_fixed_count_batches_and_resume_exactly(dataset):
    per_epoch = len(make_loader(dataset, seed=0, workers=0, budget=2))
    table = scripts(per_epoch)

    def build(*, seed, workers):
        if isinstance(workers, str):
            name, _, deep = workers.partition("+")
            script, start = table[name]
            in_flight = torch_internals.IN_FLIGHT if deep else 0
            return scripted_loader(dataset, script, seed=seed, start=start, in_flight=in_flight)
        return make_loader(dataset, seed=seed, shuffle=True, workers=workers, budget=2)

    # "+deep": with the batches kept in flight beyond torch's (the default), switches wait for
    # more of them; the batches stay the same
    assert_deterministic_and_resumable(
        build,
        seed=5,
        midpoint=per_epoch + 3,
        workers=(0, "mid", "boundary", "twice", "mid+deep", "boundary+deep"),
    )


@pytest.mark.slow
def test_switches_happen_and_show_in_stats(dataset):
    per_epoch = len(make_loader(dataset, seed=0, workers=0, budget=2))
    script, start = scripts(per_epoch)["mid"]
    loader = scripted_loader(dataset, script, seed=3, start=start)
    reference = run_epochs(make_loader(dataset, seed=3, shuffle=True, workers=0, budget=2), 2)
    got, counts = [], []
    for _ in range(2):
        for batch in loader:
            got.append(_fingerprint(batch))
            counts.append(loader.num_workers)
    assert got == reference
    switches = loader.stats().switches
    assert [(s.from_workers, s.to_workers) for s in switches] == [(1, 2), (2, 0), (0, 1)]
    # a switch takes effect after the batches already asked for: never before it was decided
    assert [(s.epoch, s.batch_in_epoch) for s in switches][0][0] == 0
    assert switches[0].batch_in_epoch >= 3 and switches[0].reason == "scripted at 0:3"
    assert set(counts) == {0, 1, 2}
    assert loader.plan.num_workers == loader.num_workers == 1
    assert "tuned live" in loader.plan.defaults[0].reason

    # with the default depth (up to 8 batches in flight while made ones wait unread, beyond 1
    # worker's 2) a switch may wait for more batches already asked for; the batches are the same
    deep = scripted_loader(
        dataset, script, seed=3, start=start, in_flight=torch_internals.IN_FLIGHT
    )
    assert deep.in_flight == torch_internals.IN_FLIGHT
    assert run_epochs(deep, 2) == reference
    moved = deep.stats().switches
    assert [(s.from_workers, s.to_workers) for s in moved][0] == (1, 2)


@pytest.mark.slow
def test_the_new_workers_start_while_the_old_ones_hand_over(dataset):
    # 1 worker, prefetch_factor 2: when the switch to 2 is decided after batch 3, batches 4 and 5
    # are asked for already. The new workers start at once, on batches 6.., and the old worker
    # hands out 4 and 5 first.
    loader = scripted_loader(dataset, {(0, 3): 2}, seed=4, start=1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert loader.num_workers == 2 and loader._handing_over == 2
    [switch] = loader.stats().switches
    assert (switch.epoch, switch.batch_in_epoch, switch.batch) == (0, 5, 5)
    assert len(loader.worker_pids()) == 2  # the new workers run already
    assert loader.state_dict()["batches_done"] == 3  # what the loop received, not the sampler
    # a dead old worker is named with what it was loading: batches 4 and 5, not the new ones'
    old = it.gi_frame.f_locals["old"]
    epoch = loader.rank_sampler.epoch_batches(0)
    paths = dict.fromkeys(p for b in epoch[3:5] for p in loader.dataset.sample_paths(b))
    assert _what_workers_loaded(old, loader, {0}, loader._old_offset) == ", ".join(paths)
    del old
    next(it)
    assert loader._handing_over == 1 and loader.state_dict()["batches_done"] == 4
    next(it)
    next(it)  # the first batch of the new workers
    assert loader._handing_over == 0 and loader.state_dict()["batches_done"] == 6
    assert loader._old_persistent is None
    rest = [_fingerprint(b) for b in it]
    reference = run_epochs(make_loader(dataset, seed=4, shuffle=True, workers=0, budget=2), 1)
    assert rest == reference[6:]

    # a loop that leaves during the hand-over: the position is what it received, also after
    # loading it back
    loader = scripted_loader(dataset, {(0, 3): 2}, seed=4, start=1)
    it = iter(loader)
    for _ in range(4):
        next(it)
    del it
    state = loader.state_dict()
    assert state["batches_done"] == 4 and loader._old_persistent is None
    loader.load_state_dict(state)
    assert loader.state_dict() == state
    assert run_epochs(loader, 1) == reference[4:]


@pytest.mark.slow
def test_state_dict_in_the_middle_of_a_switch_resumes_exactly(dataset):
    per_epoch = len(make_loader(dataset, seed=0, workers=0, budget=2))
    reference = run_epochs(make_loader(dataset, seed=9, shuffle=True, workers=0, budget=2), 2)
    # the switch to 2 is decided at batch 3 while 1 worker has batches 4 and 5 asked for:
    # stop at every batch around it, save, and resume with a fixed count.
    for stop in range(2, 8):
        loader = scripted_loader(dataset, {(0, 3): 2}, seed=9, start=1)
        got = []
        for batch in loader:
            got.append(_fingerprint(batch))
            if len(got) == stop:
                break
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = make_loader(dataset, seed=9, shuffle=True, workers=0, budget=2)
        resumed.load_state_dict(state)
        got += run_epochs(resumed, 2 - stop // per_epoch)
        assert got == reference, stop


class ScriptedConsumer:
    """A training loop on a scripted clock: every figure the tuner and the monitor read comes from
    here, so a real loader with real workers tunes the same way on a busy or an idle machine.

    The clock stands still except where the script moves it: the loop asks for a batch (the
    clock reads ``t``), waits ``wait[workers]`` seconds for it (the loader's second reading,
    ``t + wait``, with ``workers`` the count the loader runs when the batch arrives) and then
    trains for ``step`` seconds. The loader reads the clock once when the loop asks and once when
    the batch is there; a read that ends an epoch (the iterator is empty) is an ask without a
    batch, and the next epoch asks again at the same time.

    ``cpus``: the CPUs each worker count's processes use, on the same clock (the tuner reads
    their running total through ``LiveTuning.cpu_use``); ``None``: not read.
    """

    def __init__(
        self, wait: dict[int, float], step: float, cpus: dict[int, float] | None = None
    ) -> None:
        self.wait, self.step, self.cpus = wait, step, cpus
        self.now, self.reads, self.cpu_seconds = 0.0, 0, 0.0
        self.loader = None

    def clock(self) -> float:
        self.reads += 1
        if self.reads == 1:  # the ask
            return self.now
        return self.now + self.wait[self.loader.num_workers]  # the batch is there

    def loader_for(self, ds, **options):
        monitor = stoker.InputMonitor(clock=self.clock, threshold=0.5)
        self.loader = make_loader(ds, monitor=monitor, **options)
        if self.loader._tuning is not None:
            self.loader._tuning.cpu_use = None if self.cpus is None else self.cpu_use
        return self.loader

    def cpu_use(self, loader) -> float:
        return self.cpu_seconds

    def epochs(self, count: int) -> list:
        got = []
        for _ in range(count):
            self.reads = 0
            for batch in self.loader:
                got.append(_fingerprint(batch))
                spent = self.wait[self.loader.num_workers] + self.step
                self.now += spent
                if self.cpus is not None:
                    self.cpu_seconds += self.cpus.get(self.loader.num_workers, 0.0) * spent
                self.reads = 0
        return got


@pytest.mark.slow
def test_auto_tunes_live_and_remembers(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path / "cache"))
    # a 100 ms training step: 2 and 1 workers keep up (the loop waits 0% and 1%), the main
    # process alone does not (33%), so the fewest that keep up is 1 worker
    consumer = ScriptedConsumer({0: 0.05, 1: 0.001, 2: 0.0}, step=0.1)
    loader = consumer.loader_for(dataset, seed=1, shuffle=True, workers="auto", budget=2)
    assert loader.num_workers == 2 and loader._tuning is not None
    assert "started with 2 workers, the most this budget runs" in loader.plan.defaults[0].reason
    reference = run_epochs(make_loader(dataset, seed=1, shuffle=True, workers=0, budget=2), 8)
    assert consumer.epochs(8) == reference
    stats = loader.stats()
    assert stats.batches == len(reference) and not stats.warned
    # 2 keeps up -> try 1 -> keeps up -> try 0 -> does not -> back to 1, settled
    assert [(s.from_workers, s.to_workers) for s in stats.switches] == [(2, 1), (1, 0), (0, 1)]
    decision = loader._tuning.tuner.decision
    assert decision.settled and decision.workers == 1 == loader.num_workers
    assert "1 worker is the fewest that keeps up" in decision.reason
    assert "0 workers did not" in decision.reason and stats.tuning == decision.reason
    assert [w.workers for w in decision.measured] == [0, 1, 2]
    # settled within the run, with room to spare: the last switch came in the first 6 of 8
    # epochs (each switch waits for the 8 batches in flight, `torch_internals.IN_FLIGHT`; with
    # torch's 2 per worker it came in the first 5)
    assert stats.switches[-1].epoch < 6
    files = list((tmp_path / "cache" / "tune").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["live"] == {"workers": 1, "keeps_up": True, "reason": decision.reason}

    # the next run starts from the remembered count and, as it still keeps up, settles at once
    again = ScriptedConsumer({0: 0.05, 1: 0.001, 2: 0.0}, step=0.1)
    second = again.loader_for(dataset, seed=1, shuffle=True, workers="auto", budget=2)
    assert second.num_workers == 1
    assert "remembered" in second.plan.defaults[0].reason
    assert again.epochs(2) == reference[: 2 * len(second)]
    assert second.stats().switches == ()
    assert second._tuning.tuner.settled and second._tuning.tuner.decision.workers == 1
    assert second._tuning.reason.startswith("remembered: ")

    # a faster training loop: the remembered count no longer keeps up (the loop waits 60%), so
    # the search runs again, and more workers keep up
    faster = ScriptedConsumer({0: 0.05, 1: 0.03, 2: 0.0}, step=0.02)
    third = faster.loader_for(dataset, seed=1, shuffle=True, workers="auto", budget=2)
    assert third.num_workers == 1
    assert faster.epochs(5) == reference[: 5 * len(third)]
    assert [(s.from_workers, s.to_workers) for s in third.stats().switches] == [(1, 2)]
    assert "the remembered choice did not hold live" in third.stats().switches[0].reason
    assert third._tuning.tuner.settled and third._tuning.tuner.decision.workers == 2
    assert "1 worker did not" in third._tuning.reason


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cpus", "asks_ahead", "switches"),
    [
        # the 2 workers used 1.9 of 2 CPUs: 1 worker cannot deliver more; no window at 1
        ({1: 1.0, 2: 1.9}, True, []),
        # they used 1.1 CPUs (the machine is busy with something else, or the workers wait on
        # each other): 1 worker is measured; 3 (more than the CPUs) is not, as early batches
        # ask for the next (torch_internals.dispatch_by_work), which fills that wait
        ({1: 1.0, 2: 1.1}, True, [(2, 1), (1, 2)]),
        # without the early ask (no room in /dev/shm for it) 3 is measured as well
        # (3 delivers no more than 2, measured twice as a contender, so it ends on 2)
        ({1: 1.0, 2: 1.1, 3: 1.1}, False, [(2, 3), (3, 1), (1, 3), (3, 2)]),
    ],
)
def test_a_loader_bound_run_skips_counts_that_cannot_use_more_cpu(
    dataset, cpus, asks_ahead, switches
):
    # no training step: the loop always waits; 2 workers deliver a batch every 50 ms, 1 every 90
    consumer = ScriptedConsumer({0: 0.12, 1: 0.09, 2: 0.05, 3: 0.05}, step=0.0, cpus=cpus)
    loader = consumer.loader_for(dataset, seed=2, shuffle=True, workers="auto", budget=2)
    if not asks_ahead:
        # what build_loader sets when /dev/shm lacks room
        loader._ahead_rounds, loader.in_flight = 0, 0
    reference = run_epochs(make_loader(dataset, seed=2, shuffle=True, workers=0, budget=2), 9)
    assert consumer.epochs(9) == reference
    assert loader.asks_ahead is asks_ahead
    stats = loader.stats()
    assert [(s.from_workers, s.to_workers) for s in stats.switches] == switches
    decision = loader._tuning.tuner.decision
    assert decision.settled and decision.workers == 2 == loader.num_workers
    if cpus[2] > 1.5:
        assert "2 workers delivers the most" in decision.reason
        assert "not measured: 1 worker, 0 workers" in decision.reason
        assert "the workers used 1.9 CPUs" in decision.reason
        assert [w.workers for w in decision.measured] == [2]
    elif asks_ahead:
        assert "2 workers delivers the most" in decision.reason
        assert "not measured: 3 workers, more than the 2 CPUs, since batches that arrive" in (
            decision.reason
        )
        assert [w.workers for w in decision.measured] == [1, 2]
    else:
        assert "2 workers is the fewest within 3% of the best (3 workers)" in decision.reason
        assert "not measured" not in decision.reason
        assert [w.workers for w in decision.measured] == [1, 2, 3]


def test_an_explicit_count_is_never_tuned(dataset):
    loader = make_loader(dataset, seed=1, workers=1, budget=2)
    assert (
        loader._tuning is None and loader.stats().switches == () and loader.stats().tuning is None
    )


def test_one_cpu_is_not_tuned_live(dataset):
    loader = make_loader(dataset, seed=1, budget=1)
    assert loader._tuning is None and loader.num_workers == 0


def test_default_workers_tune_live(dataset):
    loader = make_loader(dataset, seed=1, budget=2)
    assert loader._tuning is not None and loader.num_workers == 2
    assert loader.plan.request.workers is None
    assert torch.is_tensor(next(iter(make_loader(dataset, seed=1, workers=0, budget=1)))["images"])
