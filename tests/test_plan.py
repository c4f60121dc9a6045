from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from stoker import Budget, LoaderRequest, MeasuredChoice, StokerWarning, plan_loader
from stoker.plan import make_plan

METHODS = ("fork", "spawn", "forkserver")


def plan(request: LoaderRequest, cpus: int, *, cuda: bool = False, methods=METHODS, measured=None):
    return make_plan(
        request,
        Budget.fixed(cpus),
        cuda_available=cuda,
        start_methods=methods,
        default_start_method=methods[0],
        measured=measured,
    )


requests = st.builds(
    LoaderRequest,
    workers=st.one_of(st.none(), st.just("auto"), st.integers(0, 300)),
    persistent=st.one_of(st.none(), st.booleans()),
    prefetch_factor=st.one_of(st.none(), st.just("auto"), st.integers(1, 8)),
    pin_memory=st.one_of(st.none(), st.booleans()),
    timeout=st.one_of(st.just(0), st.floats(0, 60, allow_nan=False)),
    start_method=st.one_of(st.none(), st.sampled_from(METHODS)),
)
budgets = st.integers(1, 256)
# What a probe may hand the planner: any count (even one above the budget, from a stale cache).
measured_choices = st.one_of(
    st.none(),
    st.builds(
        MeasuredChoice,
        workers=st.integers(0, 300),
        prefetch_factor=st.one_of(st.none(), st.integers(1, 8)),
        reason=st.just("measured"),
    ),
)


# Fake budgets above this machine's CPUs make torch warn about "excessive worker creation";
# that advice is about the fake budget, not about the plan's validity.
EXCESSIVE = "ignore:This DataLoader will create:UserWarning"


@pytest.mark.filterwarnings(EXCESSIVE)
@given(requests, budgets, measured_choices)
def test_torch_accepts_every_plan(request, cpus, measured):
    # torch is the judge: constructing validates every argument combination.
    p = plan(request, cpus, cuda=torch.cuda.is_available(), measured=measured)
    DataLoader(range(8), batch_size=3, **p.kwargs)


@pytest.mark.slow
@pytest.mark.filterwarnings(EXCESSIVE)
@settings(max_examples=12)
@given(requests, st.integers(1, 3))
def test_plans_iterate_every_sample_exactly_once(request, cpus):
    # Real worker processes (fork, spawn, forkserver) on budgets this machine can run. A timeout
    # of a fraction of a second legitimately expires while a spawned worker imports torch on a
    # busy machine; that is the timeout working, not an invalid plan.
    if 0 < request.timeout < 10:
        request = dataclasses.replace(request, timeout=10.0)
    p = plan(request, cpus, cuda=torch.cuda.is_available())
    loader = DataLoader(range(10), batch_size=3, **p.kwargs)
    for _ in range(2):  # two epochs: persistent workers are reused
        seen = [int(x) for batch in loader for x in batch]
        assert sorted(seen) == list(range(10))
    del loader


@given(requests, budgets, measured_choices, st.booleans())
def test_replanning_a_plan_changes_nothing(request, cpus, measured, cuda):
    p = plan(request, cpus, measured=measured, cuda=cuda)
    again = plan(p.as_request(), cpus, cuda=cuda)
    assert again.kwargs == p.kwargs
    assert again.adjustments == ()


@given(requests, budgets, measured_choices)
def test_every_change_from_an_explicit_request_is_explained_once(request, cpus, measured):
    p = plan(request, cpus, measured=measured)
    asked = {
        "workers": request.workers,
        "persistent": request.persistent,
        "prefetch_factor": request.prefetch_factor,
        "pin_memory": request.pin_memory,
        "timeout": request.timeout,
        "start_method": request.start_method,
    }
    got = {
        "workers": p.num_workers,
        "persistent": p.persistent_workers,
        "prefetch_factor": p.prefetch_factor,
        "pin_memory": p.pin_memory,
        "timeout": p.timeout,
        "start_method": p.multiprocessing_context,
    }
    changed = {a.setting for a in p.adjustments}
    assert len(changed) == len(p.adjustments)
    for name, value in asked.items():
        explicit = value is not None and value != "auto" and not (name == "timeout" and value == 0)
        if explicit and got[name] != value:
            assert name in changed, name
        if name in changed:
            adj = next(a for a in p.adjustments if a.setting == name)
            assert adj.requested == value and adj.chosen == got[name] and adj.reason


@given(requests, budgets, measured_choices, st.booleans())
def test_workers_within_budget(request, cpus, measured, cuda):
    assert plan(request, cpus, measured=measured, cuda=cuda).num_workers <= cpus


@given(requests, budgets, measured_choices)
def test_auto_is_always_explained_in_the_defaults(request, cpus, measured):
    p = plan(request, cpus, measured=measured)
    notes = {a.setting: a for a in p.defaults}
    if request.workers == "auto":
        assert notes["workers"].chosen == p.num_workers and notes["workers"].reason
        if measured is None:
            assert "nothing was measured" in notes["workers"].reason
    if request.prefetch_factor == "auto":
        assert notes["prefetch_factor"].chosen == p.prefetch_factor


@given(requests, budgets, budgets, st.booleans())
def test_larger_budget_never_fewer_workers(request, a, b, cuda):
    small, large = sorted((a, b))
    assert (
        plan(request, small, cuda=cuda).num_workers <= plan(request, large, cuda=cuda).num_workers
    )


def test_one_cpu_with_cuda_keeps_one_worker():
    # The training loop waits on the GPU, so one worker overlaps loading with it.
    assert plan(LoaderRequest(), 1, cuda=True).num_workers == 1
    p = plan(LoaderRequest(workers=8, persistent=True), 1, cuda=True)
    assert p.num_workers == 1 and p.persistent_workers is True
    (adj,) = p.adjustments
    assert adj.setting == "workers" and "waits on the GPU" in adj.reason


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"workers": "eight"}, r"workers='eight' is not valid: use a whole number >= 0"),
        ({"workers": -3}, r"workers=-3 is not valid"),
        ({"workers": True}, r"workers=True is not valid"),
        ({"workers": 2.5}, r"workers=2.5 is not valid"),
        ({"prefetch_factor": -1}, r"prefetch_factor=-1 is not valid: use a whole number >= 1"),
        ({"prefetch_factor": 0}, r"prefetch_factor=0"),
        ({"timeout": -1}, r"timeout=-1 is not valid"),
        ({"start_method": "thread"}, r"start_method='thread' is not valid: use one of fork"),
        ({"persistent": "yes"}, r"persistent='yes' is not valid"),
    ],
)
def test_values_with_no_safe_meaning_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_loader(budget=4, warn=False, **kwargs)


def test_one_cpu_loads_in_process_and_fixes_the_seed_crash():
    p = plan(LoaderRequest(workers=8, persistent=True, prefetch_factor=4, timeout=30), 1)
    assert p.kwargs == {
        "num_workers": 0,
        "persistent_workers": False,
        "prefetch_factor": None,
        "pin_memory": False,
        "timeout": 0.0,
        "multiprocessing_context": None,
    }
    reasons = {a.setting: a.reason for a in p.adjustments}
    assert set(reasons) == {"workers", "persistent", "prefetch_factor", "timeout"}
    assert "only core" in reasons["workers"]
    assert reasons["persistent"].startswith("persistent workers need at least one worker")


def test_defaults_from_budget():
    assert plan(LoaderRequest(), 1).num_workers == 0
    assert plan(LoaderRequest(), 2).num_workers == 1
    assert plan(LoaderRequest(), 6).num_workers == 5
    assert plan(LoaderRequest(), 64).num_workers == 8
    assert plan(LoaderRequest(workers="auto"), 6).num_workers == 5
    p = plan(LoaderRequest(), 6)
    assert p.persistent_workers and p.prefetch_factor == 2 and p.adjustments == ()


def test_clamps_to_budget():
    p = plan(LoaderRequest(workers=16), 4)
    assert p.num_workers == 4
    (adj,) = p.adjustments
    assert adj.setting == "workers" and adj.requested == 16 and adj.chosen == 4
    assert "only 4 CPUs" in adj.reason


def test_missing_start_method_falls_back():
    p = plan(LoaderRequest(workers=2, start_method="fork"), 4, methods=("spawn",))
    assert p.multiprocessing_context == "spawn"
    assert "not available on this platform" in p.adjustments[0].reason


def test_pin_memory_follows_cuda():
    assert plan(LoaderRequest(), 4, cuda=True).pin_memory is True
    assert plan(LoaderRequest(), 4, cuda=False).pin_memory is False
    p = plan(LoaderRequest(pin_memory=True), 4, cuda=False)
    assert p.pin_memory is False and p.adjustments[0].setting == "pin_memory"


def test_adjustments_warn_once_per_process():
    with pytest.warns(StokerWarning, match="persistent workers need at least one worker") as rec:
        plan_loader(workers=0, persistent=True, budget=4)
    assert len(rec) == 1
    # the same change again is not told again
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_loader(workers=0, persistent=True, budget=4)


def test_warning_points_at_the_callers_line():
    with pytest.warns(StokerWarning) as rec:
        plan_loader(workers=99, budget=2)
    assert rec[0].filename == __file__


def test_explain_names_budget_and_reasons():
    p = plan(LoaderRequest(workers=9), 3)
    text = p.explain()
    assert "CPU budget: 3" in text and "changed workers: 9 -> 3" in text
