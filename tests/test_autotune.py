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


def window(workers: int, rate: float, wait: float, batches: int = 40) -> Window:
    """``batches`` at ``rate`` batches/s where the loop waited ``wait`` of the time."""
    seconds = batches / rate
    return Window(
        workers=workers,
        batches=batches,
        samples=batches,
        windows=2,  # confirmed: measured at two different times
        wait_seconds=seconds * wait,
        step_seconds=seconds * (1 - wait),
    )


def counts_named(reason: str) -> set[int]:
    return {int(n) for n in re.findall(r"(\d+) workers?\b", reason)}


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
) -> tuple[LiveTuner, list[Decision]]:
    """Feed the tuner batch timings of a loader whose count k delivers ``capacity[k]`` batches/s
    to a consumer taking 1/consumer_rate s per batch (``None``: a consumer that does nothing).

    With workers the loader overlaps the consumer, so the loop waits only where the loader is
    slower; with 0 workers it loads inside the loop, so every load is waited for.
    """
    tuner = LiveTuner(start=start, candidates=sorted(capacity), remembered=remembered)
    decisions = []
    for i in range(batches):
        k = tuner.current
        load = 1 / capacity[k] * (1 + noise * ((i * 7919) % 13 - 6) / 6)
        step = 0.0 if consumer_rate is None else 1 / consumer_rate
        wait = load if k == 0 else max(load - step, 0.0)
        d = tuner.observe(wait, step, 1)
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
    tuner, decisions = simulate(capacity, consumer, start=start, batches=3000)
    assert tuner.settled
    for d in decisions:
        measured = {w.workers for w in d.measured}
        assert counts_named(d.reason) <= measured | {d.workers, tuner.current} | (
            {d.workers} if d.switch else set()
        )


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
    assert w.samples_per_second == 20.0


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
