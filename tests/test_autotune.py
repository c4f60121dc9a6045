"""The live tuner's rules, fed made-up measurements: no workers, no clock."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.autotune import (
    KEEP_UP_WAIT,
    MAX_REOPENINGS,
    Decision,
    Evidence,
    LiveTuner,
    Remembered,
    Window,
    decide,
)
from stoker.autotune.rules import missing_evidence, neighbours


def window(
    workers: int, rate: float, wait: float, batches: int = 40, cpus: float | None = None
) -> Window:
    """``batches`` at ``rate`` batches/s where the loop waited ``wait`` of the time (and, given
    ``cpus``, the workers used that many CPUs throughout)."""
    seconds = batches / rate
    return Window(
        workers=workers,
        batches=batches,
        samples=batches,
        windows=2,  # confirmed: measured at two different times
        wait_seconds=seconds * wait,
        step_seconds=seconds * (1 - wait),
        cpu_seconds=None if cpus is None else cpus * seconds,
        cpu_wall=0.0 if cpus is None else seconds,
    )


NOT_MEASURED = re.compile(r"not measured: ((?:\d+ workers?(?:, )?)+)")


def counts_named(reason: str) -> set[int]:
    """Counts a reason names as measured (those it lists as "not measured: ..." left out)."""
    return {int(n) for n in re.findall(r"(\d+) workers?\b", _measured_part(reason))}


def counts_not_measured(reason: str) -> set[int]:
    """Counts a reason lists as not measured (every "not measured: ..." list in it)."""
    return {
        int(n)
        for found in NOT_MEASURED.finditer(reason)
        for n in re.findall(r"(\d+) workers?", found.group(1))
    }


def _measured_part(reason: str) -> str:
    return reason.split("; not measured: ")[0]


# --- decide: tables ------------------------------------------------------------------------------


def test_too_little_evidence_says_so_and_keeps_measuring():
    d = decide({2: window(2, 40, 0.9, batches=5)}, 2, [0, 1, 2])
    assert not d.switch and not d.settled and d.workers == 2
    assert "too little evidence at 2 workers" in d.reason and "5 of 12 batches" in d.reason


def test_a_window_needs_whole_rounds_and_time():
    assert "whole round" in missing_evidence(window(4, 10, 0.5, batches=13), Evidence())
    assert "of 0.5 s" in missing_evidence(window(1, 1000, 0.5, batches=40), Evidence())
    assert missing_evidence(window(4, 10, 0.5, batches=12), Evidence()) is None


@pytest.mark.parametrize(
    ("table", "current", "expected", "settled", "words"),
    # on 2 CPUs the candidates are 0, 1, 2; the row that tries 3 has a larger budget
    [
        # loader-bound on 2 CPUs, started at 2: try below, then settle on the best
        ({2: (41, 1.0)}, 2, 1, False, "trying 1 (fewer)"),
        ({2: (41, 1.0), 1: (29, 1.0)}, 1, 2, True, "2 workers delivers the most"),
        # within 3% of the best: the fewest
        ({2: (41, 1.0), 1: (40.2, 1.0), 0: (20, 1.0)}, 1, 1, True, "fewest within 3%"),
        # the best at the top of the measured range: try above first
        ({1: (29, 1.0), 2: (41, 1.0)}, 2, 3, False, "trying 3 (more)"),
        # consumer-bound: go down while the loop keeps up, settle above the first that waits
        ({2: (10, 0.0)}, 2, 1, False, "trying 1, fewer may too"),
        ({2: (10, 0.0), 1: (10, 0.01)}, 1, 0, False, "trying 0"),
        ({2: (10, 0.0), 1: (10, 0.01), 0: (8, 0.3)}, 0, 1, True, "0 workers did not"),
        # mixed: the current count waits, a larger one kept up
        ({1: (8, 0.3), 2: (10, 0.02)}, 1, 2, True, "2 workers is the fewest that keeps up"),
    ],
)
def test_decision_table(table, current, expected, settled, words):
    windows = {k: window(k, rate, wait) for k, (rate, wait) in table.items()}
    d = decide(windows, current, [0, 1, 2, 3] if "trying 3" in words else [0, 1, 2])
    assert d.workers == expected and d.settled is settled and d.switch is (expected != current)
    assert words in d.reason
    assert counts_named(d.reason) <= set(table) | {expected}


def test_fewer_workers_that_cannot_use_more_cpu_are_not_measured():
    # Loader-bound at 2 workers whose processes used 1.9 of 2 CPUs: 1 worker (one process) could
    # reach at most 1/1.9 = 0.53x the rate, 0 workers (the main process alone) as much: neither
    # can come within 3%, so the tuner settles on 2 without paying for their windows.
    d = decide({2: window(2, 41, 1.0, cpus=1.9)}, 2, [0, 1, 2])
    assert d.settled and not d.switch and d.workers == 2
    assert "2 workers delivers the most" in d.reason
    assert "not measured: 1 worker, 0 workers" in d.reason and "at most 0.53x" in d.reason
    assert "the workers used 1.9 CPUs" in d.reason
    assert counts_named(d.reason) == {2} and counts_not_measured(d.reason) == {0, 1}
    # the same count measured once only: measured again before it settles (no switch)
    once = replace(window(2, 41, 1.0, cpus=1.9), windows=1)
    d = decide({2: once}, 2, [0, 1, 2])
    assert not d.settled and not d.switch and "measuring 2 again" in d.reason


@pytest.mark.parametrize(
    ("cpus", "tried"),
    [
        (None, 1),  # nothing read: measure as before
        (1.1, 1),  # one process could reach 1/1.1 = 0.91x: it might come within 3%, measure it
        (1.2, None),  # 0.83x at most: not measured
    ],
)
def test_only_a_cpu_reading_that_rules_fewer_out_skips_them(cpus, tried):
    d = decide({2: window(2, 41, 1.0, cpus=cpus)}, 2, [0, 1, 2])
    if tried is None:
        assert d.settled and d.workers == 2 and "not measured: 1 worker, 0 workers" in d.reason
    else:
        assert d.switch and d.workers == tried and "not measured" not in d.reason


def test_an_inconclusive_cpu_reading_is_read_again_at_the_same_count_before_trying_fewer():
    # one window at 2 workers that used 1.1 CPUs (a stretch of large images, say): not enough to
    # rule 1 worker out, so 2 is measured again first (no switch), and only then 1 is tried
    once = replace(window(2, 41, 1.0, cpus=1.1), windows=1)
    d = decide({2: once}, 2, [0, 1, 2])
    assert not d.switch and not d.settled and d.workers == 2
    assert "measuring 2 again before trying fewer" in d.reason and counts_named(d.reason) == {2}
    # the second window read more: now it rules fewer out
    d = decide({2: once.merge(replace(once, cpu_seconds=2.0 * once.cpu_wall))}, 2, [0, 1, 2])
    assert d.settled and d.workers == 2 and counts_not_measured(d.reason) == {0, 1}
    # without a CPU reading, or away from the pick, fewer is tried at once, as before
    assert decide({2: replace(once, cpu_seconds=None)}, 2, [0, 1, 2]).workers == 1
    d = decide({2: once, 1: window(1, 20, 1.0)}, 1, [0, 1, 2])
    assert d.switch and d.workers == 2 and "measuring 2 again" in d.reason


def test_a_process_that_used_more_than_one_cpu_raises_the_ceiling():
    # 2 workers used 3.0 CPUs (1.5 each, e.g. a multi-threaded decoder): one such process could
    # reach 1.5/3.0 = 0.5x; with 4 of 4 CPUs used by 4 workers, 3 could reach 0.75x
    d = decide({2: window(2, 41, 1.0, cpus=3.0)}, 2, [0, 1, 2])
    assert d.settled and "at most 0.50x" in d.reason
    d = decide({4: window(4, 41, 1.0, cpus=4.0)}, 4, [0, 1, 2, 3, 4])
    assert d.settled and "not measured: 3 workers, 2 workers, 1 worker, 0 workers" in d.reason
    # a measured count below is not "not measured"; the ones below it still can be
    d = decide({4: window(4, 41, 1.0, cpus=4.0), 3: window(3, 30, 1.0, 39)}, 4, [0, 1, 2, 3, 4])
    assert counts_not_measured(d.reason) == {0, 1, 2} and counts_named(d.reason) == {3, 4}


def test_a_consumer_that_keeps_up_still_tries_fewer_whatever_the_cpu():
    d = decide({2: window(2, 10, 0.0, cpus=1.9)}, 2, [0, 1, 2])
    assert d.switch and d.workers == 1 and "fewer may too" in d.reason


def test_the_fewest_candidate_that_keeps_up_settles_without_a_lower_one():
    d = decide({0: window(0, 10, 0.01)}, 0, [0, 1, 2])
    assert d.settled and d.workers == 0 and "did not" not in d.reason


def test_current_must_be_a_candidate():
    with pytest.raises(ValueError, match="not among the candidates"):
        decide({}, 5, [0, 1, 2])


def test_neighbours_follow_the_candidate_ladder():
    assert neighbours([0, 1, 2, 3, 4, 6, 8], 4) == (3, 6)
    assert neighbours([0, 1, 2], 0) == (None, 1)
    assert neighbours([0, 1, 2], 2) == (1, None)


def test_close_counts_are_measured_twice_before_settling():
    once = {k: replace(window(k, rate, 1.0), windows=1) for k, rate in ((1, 40.0), (2, 36.0))}
    d = decide(once, 2, [1, 2])
    assert d.switch and d.workers == 1 and "measuring 1 again" in d.reason
    d = decide({**once, 1: window(1, 40.0, 1.0)}, 1, [1, 2])
    assert d.switch and d.workers == 2 and "measuring 2 again" in d.reason
    # the count running needs its second window: no switch, keep measuring it
    d = decide({1: window(1, 36.0, 1.0), 2: once[2]}, 2, [1, 2])
    assert not d.switch and not d.settled and d.workers == 2
    d = decide({1: window(1, 40.0, 1.0), 2: window(2, 36.0, 1.0)}, 2, [1, 2])
    assert d.settled and d.workers == 1 and d.switch
    # a count clearly slower than the best (below 85%) needs no second window
    clear = {1: window(1, 40.0, 1.0), 0: replace(window(0, 20.0, 1.0), windows=1)}
    assert decide(clear, 1, [0, 1]).settled


# --- the tuner, driven by a simulated loader -----------------------------------------------------


def simulate(
    capacity: dict[int, float],
    consumer_rate: float | None,
    *,
    start: int,
    remembered: Remembered | None = None,
    batches: int = 2000,
    noise: float = 0.0,
    cpus: float | None = None,
    cpu_budget: int | None = None,
) -> tuple[LiveTuner, list[Decision]]:
    """Feed the tuner batch timings of a loader whose count k delivers ``capacity[k]`` batches/s
    to a consumer taking 1/consumer_rate s per batch (``None``: a consumer that does nothing).

    With workers the loader overlaps the consumer, so the loop waits only where the loader is
    slower; with 0 workers it loads inside the loop, so every load is waited for. ``cpus``: the
    workers use that many CPUs per worker, at most 2 in all (``None``: not read).
    """
    tuner = LiveTuner(
        start=start, candidates=sorted(capacity), remembered=remembered, cpu_budget=cpu_budget
    )
    decisions = []
    clock = {"now": 0.0}
    for i in range(batches):
        k = tuner.current
        load = 1 / capacity[k] * (1 + noise * ((i * 7919) % 13 - 6) / 6)
        step = 0.0 if consumer_rate is None else 1 / consumer_rate
        wait = load if k == 0 else max(load - step, 0.0)
        clock["now"] += wait + step
        used = None if cpus is None else min(cpus * k, 2.0)
        read = None if used is None else (lambda u=used: u * clock["now"])
        d = tuner.observe(wait, step, 1, cpu=read)
        if d is not None:
            decisions.append(d)
            if d.switch:
                tuner.switched(d.workers)
    return tuner, decisions


def test_loader_bound_two_cpus_settles_on_the_best():
    # the sweep: 0 workers 23.7, 1 worker 21.0, 2 workers 33.3 images/s
    tuner, decisions = simulate({0: 23.7, 1: 21.0, 2: 33.3}, None, start=2)
    assert tuner.settled and tuner.current == 2
    assert [d.workers for d in decisions if d.switch] == [1, 2]
    assert counts_named(tuner.decision.reason) == {1, 2}  # 0 was never measured, nor named


def test_consumer_bound_settles_on_the_fewest_that_keep_up():
    capacity = {0: 20.0, 1: 22.0, 2: 33.0, 3: 31.0}
    for consumer, expected in ((5.0, 1), (25.0, 2), (100.0, 2)):
        tuner, _ = simulate(capacity, consumer, start=2)
        assert tuner.settled and tuner.current == expected, consumer


def test_a_settled_choice_stays_under_noise():
    tuner, decisions = simulate({0: 20.0, 1: 22.0, 2: 33.0}, None, start=2, noise=0.02)
    switches = [i for i, d in enumerate(decisions) if d.switch]
    assert tuner.settled and switches and all(i < 3 for i in switches)


def test_a_remembered_choice_that_holds_settles_at_the_first_window():
    memo = Remembered(workers=2, keeps_up=False, reason="measured earlier")
    tuner, decisions = simulate({0: 20.0, 1: 22.0, 2: 33.0}, None, start=2, remembered=memo)
    assert decisions[0].settled and not any(d.switch for d in decisions)
    assert decisions[0].reason.startswith("remembered: measured earlier; checked live")


def test_a_remembered_choice_that_no_longer_holds_is_searched_again():
    memo = Remembered(workers=2, keeps_up=True, reason="a slow consumer then")
    tuner, decisions = simulate({0: 20.0, 1: 22.0, 2: 33.0}, None, start=2, remembered=memo)
    assert "did not hold live" in decisions[0].reason and decisions[0].switch
    assert tuner.settled and tuner.current == 2


def test_a_consumer_that_speeds_up_reopens_the_search_a_bounded_number_of_times():
    capacity = {0: 20.0, 1: 22.0, 2: 33.0}
    tuner = LiveTuner(start=2, candidates=[0, 1, 2])
    # none (loader-bound) -> slow (2 keep up: fewer?) -> fast (1 waits) -> none (2 wait) -> slow
    phases = [None, 5.0, 30.0, None, 5.0]
    reopened = 0
    for rate in [r for r in phases for _ in range(400)]:
        k = tuner.current
        step, load = (0.0 if rate is None else 1 / rate), 1 / capacity[k]
        d = tuner.observe(load if k == 0 else max(load - step, 0.0), step, 1)
        if d is not None and "re-check" in d.reason and "stays" not in d.reason:
            reopened += 1
        if d is not None and d.switch:
            tuner.switched(d.workers)
    assert tuner.reopenings == MAX_REOPENINGS == reopened
    assert "the choice stays" in tuner.decision.reason


def test_memory_limit_forces_a_switch_down():
    tuner = LiveTuner(start=4, candidates=[0, 1, 2, 3, 4])
    d = tuner.limit(2, "workers use 900 MiB each of 2 GiB usable")
    assert d is not None and d.switch and d.workers == 2 and "at most 2 workers fit" in d.reason
    assert tuner.candidates == (0, 1, 2)
    assert tuner.limit(3, "more memory now") is None


def test_a_count_measured_again_counts_two_windows():
    tuner = LiveTuner(start=1, candidates=[1, 2])
    for _ in range(2):
        tuner.switched(1)
        while tuner.observe(0.1, 0.0, 1) is None:
            pass
    assert tuner.windows[1].windows == 2 and tuner.windows[1].batches == 24


def test_warm_up_round_is_not_timed():
    tuner = LiveTuner(start=3, candidates=[0, 3])
    for _ in range(3):
        assert tuner.observe(10.0, 0.0, 1) is None  # a 10 s start-up, not counted
    assert tuner._open.batches == 0


# --- properties ----------------------------------------------------------------------------------

capacities = st.lists(st.floats(5, 100), min_size=2, max_size=6).map(
    lambda rates: {k: r for k, r in enumerate(rates)}
)


@given(capacities, st.one_of(st.none(), st.floats(1, 150)), st.data())
def test_never_names_an_unmeasured_count_and_always_settles(capacity, consumer, data):
    start = data.draw(st.sampled_from(sorted(capacity)))
    cpus = data.draw(st.one_of(st.none(), st.floats(0.1, 12)))
    tuner, decisions = simulate(capacity, consumer, start=start, batches=3000, cpus=cpus)
    assert tuner.settled
    for d in decisions:
        measured = {w.workers for w in d.measured}
        assert counts_named(d.reason) <= measured | {d.workers, tuner.current} | (
            {d.workers} if d.switch else set()
        )
        assert not counts_not_measured(d.reason) & measured


@given(capacities, st.floats(1, 150))
def test_the_settled_count_keeps_up_when_any_count_can(capacity, consumer):
    tuner, _ = simulate(capacity, consumer, start=max(capacity), batches=3000)
    chosen = tuner.windows[tuner.current]
    if chosen.keeps_up:
        below = [k for k in tuner.windows if k < tuner.current]
        assert all(not tuner.windows[k].keeps_up for k in below)
        assert chosen.wait_fraction <= KEEP_UP_WAIT
    else:  # nothing measured keeps up: the settled count is within 3% of the best measured
        best = max(w.samples_per_second for w in tuner.windows.values())
        assert chosen.samples_per_second >= 0.97 * best - 1e-9


def test_describe_names_the_count_rate_wait_and_batches():
    w = Window(workers=2, batches=10, samples=20, wait_seconds=1.0)
    assert w.describe() == "2 workers 10 batches/s, waited 100% (10 batches)"
    assert w.samples_per_second == 20.0 and w.cpus is None
    w = replace(w, cpu_seconds=0.95, cpu_wall=0.5)
    assert (
        w.describe()
        == "2 workers 10 batches/s, waited 100% (10 batches, the workers used 1.9 CPUs)"
    )


def test_a_window_keeps_the_cpu_read_between_its_first_and_last_batch():
    readings = iter([10.0, 11.9])  # CPU seconds used by the workers so far: at open, at close
    tuner = LiveTuner(start=2, candidates=[0, 1, 2])
    for _ in range(2):  # the first round, not timed: nothing read
        tuner.observe(0.1, 0.0, 1, cpu=lambda: pytest.fail("read during the warm-up"))
    decision = None
    while decision is None:
        decision = tuner.observe(0.1, 0.0, 1, cpu=lambda: next(readings))
    w = tuner.windows[2]
    # read after the first batch (0.1 s in) and after the last: 1.9 CPU s over the 11 batches between
    assert w.batches == 12 and w.cpu_seconds == pytest.approx(1.9)
    assert w.cpu_wall == pytest.approx(1.1) and w.cpus == pytest.approx(1.9 / 1.1)
    # merged with a second window that was not read: the reading stays, over its own seconds
    assert w.merge(replace(w, cpu_seconds=None, cpu_wall=0.0)).cpus == pytest.approx(1.9 / 1.1)
    assert w.merge(w).cpus == pytest.approx(1.9 / 1.1)


def test_with_cpu_readings_the_loader_bound_search_skips_what_cannot_win():
    # the sweep again, with the 2 workers using 1.9 CPUs: no switch at all
    tuner, decisions = simulate({0: 23.7, 1: 21.0, 2: 33.3}, None, start=2, cpus=0.95)
    assert tuner.settled and tuner.current == 2 and not any(d.switch for d in decisions)
    assert counts_not_measured(tuner.decision.reason) == {0, 1}
    # a consumer that 1 worker keeps up with is still found
    tuner, _ = simulate({0: 20.0, 1: 22.0, 2: 33.0}, 5.0, start=2, cpus=0.95)
    assert tuner.settled and tuner.current == 1


def test_the_burst_loaded_during_a_hand_over_is_not_timed():
    # Switched to 1 worker with prefetch 2 while the old workers handed over: the new worker
    # loaded 2 batches meanwhile, which arrive at once and would time as a rate of infinity.
    tuner = LiveTuner(start=2, candidates=[1, 2])
    tuner.switched(1, burst=2)
    for _ in range(2):
        assert tuner.observe(0.0, 0.0, 1) is None
    assert tuner._open.batches == 0
    while tuner.observe(0.1, 0.0, 1) is None:  # then 10 batches/s, every one timed
        pass
    assert tuner.windows[1].wait_seconds == pytest.approx(0.1 * tuner.windows[1].batches)
    # Without a hand-over only the first round is left out, as before.
    tuner.switched(2)
    for _ in range(2):
        assert tuner.observe(5.0, 0.0, 1) is None
    tuner.observe(0.1, 0.0, 1)
    assert tuner._open.batches == 1


@pytest.mark.parametrize(
    ("cpus", "tried"),
    [
        (1.6, 3),  # 0.4 of the 2 CPUs idle: one worker more might fill it, measure it
        (1.8, None),  # 0.2 idle, under SPARE_CPU: not measured
        (None, None),  # nothing read: a count above the CPUs is never tried blind
    ],
)
def test_one_worker_above_the_cpus_is_measured_only_when_cpu_was_left_idle(cpus, tried):
    # loader-bound at 2 workers on 2 CPUs, fewer already measured and slower
    windows = {1: window(1, 21, 1.0), 2: window(2, 33, 1.0, cpus=cpus)}
    d = decide(windows, 2, [0, 1, 2, 3], cpu_budget=2)
    if tried is None:
        assert not d.switch and d.workers == 2 and 3 in counts_not_measured(d.reason)
        assert "more than the 2 CPUs" in d.reason
        assert 3 not in counts_named(d.reason)
    else:
        assert d.switch and d.workers == 3 and "trying 3 (more)" in d.reason
        # measured once only: the count running is measured again first (no switch)
        once = {**windows, 2: replace(windows[2], windows=1)}
        d = decide(once, 2, [0, 1, 2, 3], cpu_budget=2)
        assert not d.switch and d.workers == 2 and "measuring 2 again before trying 3" in d.reason
    # without a CPU budget every candidate is within it, as before
    assert decide(windows, 2, [0, 1, 2, 3]).workers == 3
    # batches that arrive early ask for the next: that fills the wait one worker more would, so
    # it is never measured, whatever CPU was left idle, and the reason says why
    d = decide(windows, 2, [0, 1, 2, 3], cpu_budget=2, asks_ahead=True)
    assert not d.switch and d.settled and d.workers == 2
    assert 3 in counts_not_measured(d.reason) and 3 not in counts_named(d.reason)
    assert "already ask for the next" in d.reason


def test_the_early_ask_is_read_from_running_workers_only():
    # While the tuner measures 0 workers nothing asks ahead, but that says nothing about the
    # workers it compares: the flag keeps what the last running workers did.
    from stoker.autotune.driver import LiveTuning
    from stoker.plan import LoaderRequest

    tuner = LiveTuner(start=2, candidates=[0, 1, 2, 3], cpu_budget=2)
    tuning = LiveTuning(
        tuner=tuner, request=LoaderRequest(workers="auto"), plan_for=lambda request: None
    )

    class Running:
        num_workers, asks_ahead = 2, True

    tuning.observe(Running(), 0.0, 0.01, [0])
    assert tuner.asks_ahead
    Running.num_workers, Running.asks_ahead = 0, False
    tuning.observe(Running(), 0.02, 0.03, [0])
    assert tuner.asks_ahead
    Running.num_workers = 1  # workers again, these without the early ask
    tuning.observe(Running(), 0.04, 0.05, [0])
    assert not tuner.asks_ahead


def test_the_main_process_cpu_counts_against_the_idle_cpu():
    # 2 workers used 1.6 CPUs: alone, 0.4 of 2 left idle (3 is tried, as above); with the main
    # process at 0.3 (converting batches, the training loop) only 0.1 is idle: 3 is not measured,
    # and the reason names both readings.
    two = window(2, 33, 1.0, cpus=1.6)
    windows = {1: window(1, 21, 1.0), 2: replace(two, main_cpu_seconds=0.3 * two.cpu_wall)}
    assert windows[2].main_cpus == pytest.approx(0.3)
    d = decide(windows, 2, [0, 1, 2, 3], cpu_budget=2)
    assert not d.switch and d.workers == 2 and 3 in counts_not_measured(d.reason)
    assert "2 workers used 1.6 CPUs and the main process 0.3, under 0.25 left idle" in d.reason
    assert "the main process 0.3" in windows[2].describe()
    light = {**windows, 2: replace(two, main_cpu_seconds=0.1 * two.cpu_wall)}
    assert decide(light, 2, [0, 1, 2, 3], cpu_budget=2).workers == 3
    # merged windows add the main process's seconds; one without a reading drops it
    merged = windows[2].merge(windows[2])
    assert merged.main_cpus == pytest.approx(0.3) and merged.cpus == pytest.approx(1.6)
    assert windows[2].merge(two).main_cpu_seconds is None


def test_the_tuner_reads_the_main_process_cpu_with_the_workers():
    tuner = LiveTuner(start=2, candidates=[0, 1, 2], evidence=Evidence(min_seconds=0.0))
    workers, main = iter([10.0, 11.6]), iter([5.0, 5.3])
    decision = None
    for _ in range(40):
        decision = tuner.observe(
            0.1, 0.0, 1, cpu=lambda: next(workers), main_cpu=lambda: next(main)
        )
        if decision is not None:
            break
    assert decision is not None
    closed = tuner.windows[2]
    assert closed.cpu_seconds == pytest.approx(1.6)
    assert closed.main_cpu_seconds == pytest.approx(0.3)


def test_the_live_search_goes_above_the_cpus_when_that_delivers_more():
    # 2 workers use 0.8 CPU each (1.6 of 2: they wait on each other's costly batches); 3 deliver
    # 8% more (the 40-image set of issue 13), so the tuner ends there, and stays at 2 when the
    # third worker would not help.
    tuner, decisions = simulate(
        {0: 12.0, 1: 13.0, 2: 50.0, 3: 54.0}, None, start=2, cpus=0.8, cpu_budget=2
    )
    assert tuner.settled and tuner.current == 3
    assert [(d.workers) for d in decisions if d.switch] == [3]  # one switch, no back and forth
    tuner, _ = simulate({0: 12.0, 1: 13.0, 2: 50.0, 3: 47.0}, None, start=2, cpus=0.8, cpu_budget=2)
    assert tuner.settled and tuner.current == 2 and 3 in counts_named(tuner.decision.reason)
    # 2 workers that use all of both CPUs: 3 is not measured, and no switch at all
    tuner, decisions = simulate(
        {0: 12.0, 1: 13.0, 2: 50.0, 3: 54.0}, None, start=2, cpus=0.96, cpu_budget=2
    )
    assert tuner.settled and tuner.current == 2 and not any(d.switch for d in decisions)
    assert counts_not_measured(tuner.decision.reason) == {0, 1, 3}


def test_a_live_count_above_the_cpus_is_planned_as_it_stands():
    # The planner caps an asked-for count at the CPUs; a count the live tuner measured its way
    # to (one above them, rules.SPARE_CPU) is planned as it is, and says why.
    from stoker.autotune.driver import live_plan
    from stoker.plan import LoaderRequest
    from stoker.planning import plan_request

    def plan_for(request: LoaderRequest):
        return plan_request(request, budget=2, warn=False)

    assert plan_for(LoaderRequest(workers=3)).num_workers == 2  # the cap this goes past
    decision = Decision(workers=3, switch=False, settled=True, reason="3 workers delivers the most")
    plan = live_plan(LoaderRequest(workers="auto"), 3, decision, plan_for)
    assert plan.num_workers == 3 and plan.persistent_workers and plan.prefetch_factor == 2
    assert not any(a.setting == "workers" for a in plan.adjustments)
    assert "tuned live on this run: 3 workers delivers the most" in plan.defaults[0].reason
