"""Turn any requested loader settings and a CPU budget into a valid DataLoader configuration.

Pure: no I/O, no environment, no processes. Each rule is a small function that may change one
setting and returns the ``Adjustment`` that says why. The rules, in order:

1. **workers** — ``None`` picks the default: 0 on a 1-CPU budget (1 with CUDA), else the budget minus one (the
   training loop keeps a CPU), at most 8. ``"auto"`` takes the count a probe measured on the dataset
   (a ``MeasuredChoice`` from ``stoker.tune``, passed in as data), clamped to the budget; with no
   measurement (``plan_loader`` has no dataset) it means the default, and the plan's ``defaults``
   say so. A request above the budget is clamped to it. On a 1-CPU budget **without CUDA** any
   worker count becomes 0: a worker on the only core adds IPC and competes with a training loop
   that computes on the same CPU (sd-scripts' loader on one CPU: 0 workers 28 images/s, 1 worker
   22.6, 2 workers 20.7; stoker under ``taskset -c 0``: 19.8, 15.8 and 14.8). **With CUDA** the
   1-CPU budget allows (and defaults to) 1 worker: the training loop mostly waits on the GPU, and a
   worker fills that wait (measured with a 185 ms wait per batch: 1 worker 15.9 images/s against
   9.6 in-process; docs/performance.md, section 6).
2. **persistent** — ``None`` means on when there are workers (no re-spawn gap at each epoch); on with
   0 workers is turned off (PyTorch raises on it).
3. **prefetch_factor** — ``None`` means PyTorch's 2 with workers; ``"auto"`` takes the measured
   value, else 2; any value with 0 workers is dropped.
4. **timeout** — only worker processes can time out; with 0 workers it becomes 0.
5. **start_method** — dropped with 0 workers; a method this platform lacks falls back to its default.
6. **pin_memory** — ``None`` means "when CUDA is available"; ``True`` without CUDA is turned off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from stoker.system.cpu import Budget

__all__ = [
    "DATALOADER_NAMES",
    "DEFAULT_MAX_WORKERS",
    "Adjustment",
    "LoaderPlan",
    "LoaderRequest",
    "MeasuredChoice",
    "Measurement",
]

DEFAULT_MAX_WORKERS = 8
START_METHODS = ("fork", "spawn", "forkserver")

# The one table between the two vocabularies: a request's field (the user's word) and the
# DataLoader argument a plan sets for it (PyTorch's word). Fields not listed share one name.
DATALOADER_NAMES = {
    "workers": "num_workers",
    "persistent": "persistent_workers",
    "prefetch_factor": "prefetch_factor",
    "pin_memory": "pin_memory",
    "timeout": "timeout",
    "start_method": "multiprocessing_context",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoaderRequest:
    """What the user asked for; ``None`` means "choose for me".

    Attributes:
        workers: worker processes: an int >= 0, ``"auto"`` or ``None``.
        persistent: keep workers alive between epochs (``persistent_workers``).
        prefetch_factor: batches each worker loads ahead (int >= 1), ``"auto"`` or ``None``.
        pin_memory: copy batches to page-locked memory for faster host-to-GPU transfer.
        timeout: seconds to wait for a batch from a worker (0 = forever); a number >= 0.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"`` (``multiprocessing_context``).
    """

    workers: int | Literal["auto"] | None = None
    persistent: bool | None = None
    prefetch_factor: int | Literal["auto"] | None = None
    pin_memory: bool | None = None
    timeout: float = 0
    start_method: str | None = None

    def __post_init__(self) -> None:
        _check_workers(self.workers)
        _check_optional_bool("persistent", self.persistent)
        _check_optional_bool("pin_memory", self.pin_memory)
        pf = self.prefetch_factor
        if (
            pf is not None
            and pf != "auto"
            and (isinstance(pf, bool) or not isinstance(pf, int) or pf < 1)
        ):
            raise ValueError(
                f"prefetch_factor={pf!r} is not valid: use a whole number >= 1 (batches each "
                "worker loads ahead), 'auto' to measure, or None for PyTorch's default of 2"
            )
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(
                f"timeout={t!r} is not valid: use seconds >= 0 (0 waits forever for a worker)"
            )
        sm = self.start_method
        if sm is not None and sm not in START_METHODS:
            raise ValueError(
                f"start_method={sm!r} is not valid: use one of {', '.join(START_METHODS)} or None"
            )


def _check_workers(workers: object) -> None:
    if workers is None or workers == "auto":
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(
            f"workers={workers!r} is not valid: use a whole number >= 0 (0 loads in the main "
            "process), 'auto' to measure, or None for the default from the CPU budget"
        )


def _check_optional_bool(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not valid: use True, False or None")


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    """One candidate setting as the tuning probe measured it (``stoker.tune``).

    Attributes:
        workers: worker processes of the candidate (0: loading in the main process).
        prefetch_factor: batches each worker loaded ahead (``None`` with 0 workers).
        batches_per_second: the steady rate: batches after the first, over whole rounds of one
            batch per worker, divided by the time from the first batch to the last; 0.0 when the
            candidate was skipped.
        samples_per_second: the same rate counted in samples.
        batches: batches timed after the first.
        first_batch_seconds: from ``iter(loader)`` to the first batch (worker start included).
        worker_memory_bytes: the memory one worker adds (largest USS among the workers, plus the
            batches it holds ahead); ``None`` with 0 workers or where ``/proc`` cannot tell.
        note: why the candidate was stopped early or skipped; ``""`` when measured in full.
    """

    workers: int
    prefetch_factor: int | None
    batches_per_second: float
    samples_per_second: float
    batches: int
    first_batch_seconds: float
    worker_memory_bytes: int | None = None
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredChoice:
    """What a probe chose for ``workers="auto"`` (and ``prefetch_factor="auto"``), as data.

    Attributes:
        workers: the chosen worker count.
        prefetch_factor: the chosen prefetch factor (``None``: the planner's default).
        reason: one plain sentence: the rule that picked it and the figures behind it.
        measurements: every candidate measured, in the order measured.
    """

    workers: int
    prefetch_factor: int | None
    reason: str
    measurements: tuple[Measurement, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Adjustment:
    """One setting the planner chose differently from the request, and why.

    Attributes:
        setting: the LoaderRequest field (``workers``, ``persistent``, ...).
        requested: the value asked for (``None`` = not given).
        chosen: the value planned.
        reason: one plain sentence a user can act on.
        measurements: for a measured choice (``"auto"``), the candidates behind it.
    """

    setting: str
    requested: object
    chosen: object
    reason: str
    measurements: tuple[Measurement, ...] = ()

    def __str__(self) -> str:
        return f"{self.setting}: {self.requested!r} -> {self.chosen!r}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoaderPlan:
    """A concrete, always valid DataLoader configuration with its reasons.

    Attributes:
        num_workers, persistent_workers, prefetch_factor, pin_memory, timeout,
        multiprocessing_context: the DataLoader arguments, by PyTorch's names.
        adjustments: explicit requests that were changed (each is warned once per process).
        defaults: settings left to stoker and what it chose (not warned).
        budget: the CPU budget the plan was made for.
        request: the request it was made from.
    """

    num_workers: int
    persistent_workers: bool
    prefetch_factor: int | None
    pin_memory: bool
    timeout: float
    multiprocessing_context: str | None
    adjustments: tuple[Adjustment, ...] = ()
    defaults: tuple[Adjustment, ...] = ()
    budget: Budget
    request: LoaderRequest = field(default_factory=LoaderRequest)

    @property
    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``torch.utils.data.DataLoader`` (the only bridge into torch)."""
        return {name: getattr(self, name) for name in DATALOADER_NAMES.values()}

    def as_request(self) -> LoaderRequest:
        """The request that, planned again on the same budget, yields this plan unchanged."""
        return LoaderRequest(
            **{field: getattr(self, name) for field, name in DATALOADER_NAMES.items()}
        )

    def explain(self) -> str:
        """Render the budget, the plan and every reason, one item a line."""
        lines = [f"CPU budget: {self.budget.cpus} ({self.budget.source})"]
        lines += [f"  {k} = {v!r}" for k, v in self.kwargs.items()]
        lines += [f"  changed {a}" for a in self.adjustments]
        lines += [f"  default {a}" for a in self.defaults]
        return "\n".join(lines)


@dataclass(slots=True)
class _Draft:
    """Mutable scratch state while rules run; frozen into a LoaderPlan at the end."""

    workers: int
    persistent: bool
    prefetch_factor: int | None
    pin_memory: bool
    timeout: float
    start_method: str | None
    adjustments: list[Adjustment] = field(default_factory=list)
    defaults: list[Adjustment] = field(default_factory=list)


def default_workers(budget: Budget, *, accelerator: bool = False) -> int:
    """The worker count for ``workers=None``: on 1 CPU 0 (1 with an accelerator), else cpus - 1,
    at most 8."""
    if budget.cpus <= 1:
        return 1 if accelerator else 0
    return min(budget.cpus - 1, DEFAULT_MAX_WORKERS)


def max_useful_workers(budget: Budget, *, accelerator: bool = False) -> int:
    """The most workers worth running on this budget: the CPUs, except 0 on 1 CPU without an
    accelerator (see the module docstring)."""
    if budget.cpus <= 1:
        return 1 if accelerator else 0
    return budget.cpus


def make_plan(
    request: LoaderRequest,
    budget: Budget,
    *,
    cuda_available: bool,
    start_methods: Sequence[str],
    default_start_method: str | None,
    measured: MeasuredChoice | None = None,
) -> LoaderPlan:
    """Plan ``request`` on ``budget``. Pure; the caller supplies what the platform offers.

    Args:
        request: what the user asked for.
        budget: the CPU budget of this rank.
        cuda_available: whether pinned memory can be used.
        start_methods: the multiprocessing start methods this platform has.
        default_start_method: the one PyTorch would use when none is given.
        measured: a probe's choice; used only for fields requested as ``"auto"``.
    """
    draft = _Draft(
        workers=0,
        persistent=False,
        prefetch_factor=None,
        pin_memory=False,
        timeout=float(request.timeout),
        start_method=request.start_method,
    )
    rules: tuple[Callable[[_Draft, LoaderRequest], None], ...] = (
        lambda d, r: _rule_workers(d, r, budget, measured, cuda_available),
        _rule_persistent,
        lambda d, r: _rule_prefetch(d, r, measured),
        _rule_timeout,
        lambda d, r: _rule_start_method(d, r, start_methods, default_start_method),
        lambda d, r: _rule_pin_memory(d, r, cuda_available),
    )
    for rule in rules:
        rule(draft, request)
    return LoaderPlan(
        num_workers=draft.workers,
        persistent_workers=draft.persistent,
        prefetch_factor=draft.prefetch_factor,
        pin_memory=draft.pin_memory,
        timeout=draft.timeout,
        multiprocessing_context=draft.start_method,
        adjustments=tuple(draft.adjustments),
        defaults=tuple(draft.defaults),
        budget=budget,
        request=request,
    )


def _changed(d: _Draft, setting: str, requested: object, chosen: object, reason: str) -> None:
    d.adjustments.append(
        Adjustment(setting=setting, requested=requested, chosen=chosen, reason=reason)
    )


def _chose(
    d: _Draft,
    setting: str,
    requested: object,
    chosen: object,
    reason: str,
    measurements: tuple[Measurement, ...] = (),
) -> None:
    d.defaults.append(
        Adjustment(
            setting=setting,
            requested=requested,
            chosen=chosen,
            reason=reason,
            measurements=measurements,
        )
    )


def _default_workers_reason(budget: Budget, cuda: bool) -> str:
    if budget.cpus <= 1 and cuda:
        return (
            "the CPU budget is 1 and CUDA is available: the training loop mostly waits on the "
            "GPU, and one worker loads the next batch meanwhile"
        )
    if budget.cpus <= 1:
        return (
            "the CPU budget is 1, and a worker on the only core is slower than loading "
            "in the main process"
        )
    return (
        f"the CPU budget is {budget.cpus} ({budget.source}); one CPU is left to the "
        f"training loop, at most {DEFAULT_MAX_WORKERS} workers"
    )


def _rule_workers(
    d: _Draft, r: LoaderRequest, budget: Budget, measured: MeasuredChoice | None, cuda: bool
) -> None:
    if r.workers == "auto" and measured is not None:
        top = max_useful_workers(budget, accelerator=cuda)
        d.workers = min(measured.workers, top)
        why = measured.reason
        if d.workers != measured.workers:
            why += f"; clamped to {top}, the most this CPU budget runs ({budget.source})"
        _chose(d, "workers", r.workers, d.workers, why, measured.measurements)
        return
    if r.workers is None or r.workers == "auto":
        d.workers = default_workers(budget, accelerator=cuda)
        why = _default_workers_reason(budget, cuda)
        if r.workers == "auto":
            why = (
                "nothing was measured (no dataset to probe: make_loader(dataset, "
                "workers='auto') or stoker tune measure), so the default: " + why
            )
        _chose(d, "workers", r.workers, d.workers, why)
        return
    top = max_useful_workers(budget, accelerator=cuda)
    d.workers = min(r.workers, top)
    if d.workers == r.workers:
        return
    if top == 0:
        why = (
            "the CPU budget is 1 CPU and a worker would share the only core with the training "
            f"loop, which is slower; loading in the main process ({budget.source})"
        )
    elif budget.cpus <= 1:
        why = (
            "the CPU budget is 1 CPU: one worker loads while the training loop waits on the GPU, "
            f"more would compete for the only core ({budget.source})"
        )
    else:
        why = (
            f"only {budget.cpus} CPU{' is' if budget.cpus == 1 else 's are'} available to this "
            f"process ({budget.source}); more workers would compete for them and use more RAM"
        )
    _changed(d, "workers", r.workers, d.workers, why)


def _rule_persistent(d: _Draft, r: LoaderRequest) -> None:
    if r.persistent is None:
        d.persistent = d.workers > 0
        why = (
            "keeps workers alive between epochs, so no epoch waits for new workers"
            if d.persistent
            else "there are no worker processes to keep alive"
        )
        _chose(d, "persistent", None, d.persistent, why)
    elif r.persistent and d.workers == 0:
        d.persistent = False
        _changed(
            d,
            "persistent",
            True,
            False,
            "persistent workers need at least one worker; turned off because workers is 0",
        )
    else:
        d.persistent = r.persistent


def _rule_prefetch(d: _Draft, r: LoaderRequest, measured: MeasuredChoice | None) -> None:
    if d.workers == 0:
        d.prefetch_factor = None
        if r.prefetch_factor == "auto":
            _chose(d, "prefetch_factor", "auto", None, "there are no workers to prefetch")
        elif r.prefetch_factor is not None:
            _changed(
                d,
                "prefetch_factor",
                r.prefetch_factor,
                None,
                "prefetching is done by worker processes; dropped because workers is 0",
            )
    elif r.prefetch_factor == "auto" and measured is not None and measured.prefetch_factor:
        d.prefetch_factor = measured.prefetch_factor
        _chose(d, "prefetch_factor", "auto", d.prefetch_factor, measured.reason)
    elif r.prefetch_factor is None or r.prefetch_factor == "auto":
        d.prefetch_factor = 2
        why = "PyTorch's default: 2 batches ahead per worker"
        if r.prefetch_factor == "auto":
            why = "nothing was measured, so " + why
        _chose(d, "prefetch_factor", r.prefetch_factor, 2, why)
    else:
        d.prefetch_factor = r.prefetch_factor


def _rule_timeout(d: _Draft, r: LoaderRequest) -> None:
    if d.workers == 0 and r.timeout:
        d.timeout = 0.0
        _changed(
            d,
            "timeout",
            r.timeout,
            0.0,
            "timeout applies only to worker processes; set to 0 because workers is 0",
        )


def _rule_start_method(
    d: _Draft, r: LoaderRequest, methods: Sequence[str], default: str | None
) -> None:
    if d.workers == 0:
        d.start_method = None
        if r.start_method is not None:
            _changed(
                d,
                "start_method",
                r.start_method,
                None,
                "a start method applies only to worker processes; dropped because workers is 0",
            )
    elif r.start_method is not None and r.start_method not in methods:
        d.start_method = default
        _changed(
            d,
            "start_method",
            r.start_method,
            default,
            f"{r.start_method!r} is not available on this platform "
            f"(available: {', '.join(methods)}); using the platform default",
        )


def _rule_pin_memory(d: _Draft, r: LoaderRequest, cuda: bool) -> None:
    if r.pin_memory is None:
        d.pin_memory = cuda
        _chose(
            d,
            "pin_memory",
            None,
            cuda,
            "CUDA is available" if cuda else "no CUDA device: nothing to pin memory for",
        )
    elif r.pin_memory and not cuda:
        d.pin_memory = False
        _changed(
            d,
            "pin_memory",
            True,
            False,
            "pinned memory only speeds up copies to a CUDA device, and none is available",
        )
    else:
        d.pin_memory = r.pin_memory
