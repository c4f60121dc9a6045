"""Build a real ``torch.utils.data.DataLoader`` from a plan: ``build_loader``, the only place one is made.

The ``StokerLoader`` it returns knows its plan and seed, resumes exactly, names dead workers,
and times how long training waits for each batch (``stoker.monitor``). Deciding the plan is
``stoker.planning``'s job and measuring it ``stoker.tune``'s; ``make_loader`` (``loader.make``)
puts the three together.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from stoker import torch_internals
from stoker.autotune.driver import LiveTuning
from stoker.data.buffers import shm_free_bytes
from stoker.data.protocol import BatchingDataset, ResumableBatchSampler
from stoker.data.sampler import AllRanksBatchSampler
from stoker.errors import InputBoundWarning, Problem
from stoker.loader.failures import explain_failure, stop_workers
from stoker.monitor import (
    InputMonitor,
    LoaderStats,
    batch_samples,
    input_bound_advice,
    input_bound_message,
)
from stoker.plan import Adjustment, LoaderPlan, max_useful_workers
from stoker.system.platform import default_start_method, distributed_from_env
from stoker.warn import tell, warn

__all__ = ["StokerLoader", "WorkerInit", "build_loader"]

logger = logging.getLogger("stoker")


class WorkerInit:
    """Seeds ``random``, NumPy and torch in each worker from (seed, worker id); picklable for spawn.

    Each worker also gets one intra-op thread: workers are already one process per CPU, and more
    threads per worker would oversubscribe the budget.
    """

    def __init__(self, seed: int, user_fn: Callable[[int], None] | None = None) -> None:
        self.seed = seed
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        state = np.random.SeedSequence([self.seed, worker_id]).generate_state(2, dtype=np.uint32)
        worker_seed = (int(state[0]) << 32) | int(state[1])
        random.seed(worker_seed)
        np.random.seed(int(state[0]))
        torch.manual_seed(worker_seed)
        torch.set_num_threads(1)
        if self.user_fn is not None:
            self.user_fn(worker_id)


class StokerLoader(DataLoader):  # type: ignore[type-arg]
    """A ``torch.utils.data.DataLoader`` that knows its plan and seed, resumes, and fails clearly.

    - ``loader.plan`` and ``loader.seed``: what it was built from.
    - ``state_dict()`` / ``load_state_dict()``: the position in the epoch, counted in batches the
      training loop received (not the ones prefetched ahead), so a resumed run yields exactly the
      remaining batches. Needs a sampler with ``state_dict`` (stoker datasets have one).
    - A worker that dies (OOM killer, SIGKILL) raises ``WorkerFailed`` naming the worker and the
      images it was loading; a full ``/dev/shm`` raises ``SharedMemoryFull`` with the fix.
    - Batches of stoker datasets carry ``replaced``: files that failed to decode in a worker and
      were replaced by another image of their bucket; the loader records them in
      ``dataset.decode_problems`` and warns once per file.
    - ``stats()``: how long the training loop waited for data (``stoker.monitor``); when it waits
      too much the loader warns once with what to try.
    """

    plan: LoaderPlan
    seed: int
    monitor: InputMonitor | None = None
    decode_problems: list[Any]
    _live: Any = None
    _tuning: LiveTuning | None = None
    # During a live-tuning hand-over: batches the old workers still hand out (the sampler already
    # continues after them), and the old persistent iterator to stop once they are out.
    _handing_over: int = 0
    _old_persistent: Any = None
    _old_offset: int = 0  # see _hand_over: to name what a dead old worker was loading
    # Rounds of workers x prefetch_factor that may wait ahead of their turn
    # (torch_internals.dispatch_by_work); 0 where /dev/shm has no room for them (`_transit_room`).
    _ahead_rounds: int = torch_internals.AHEAD_ROUNDS
    # Batches the workers are kept asked for ahead of the loop, at least torch's
    # workers x prefetch_factor (`torch_internals.IN_FLIGHT`); 0: torch's alone (a prefetch_factor
    # was given, or /dev/shm has no room).
    in_flight: int = 0
    # Whether the running workers' early batches ask for the next (the live tuner reads it).
    asks_ahead: bool = False

    @property
    def rank_sampler(self) -> Any:
        """What this loader iterates: this rank's batch sampler.

        For stoker datasets ``batch_sampler`` yields every rank's batches
        (``AllRanksBatchSampler``), so that ``accelerator.prepare(loader)``, which shards
        ``batch_sampler`` again, keeps every sample; the loader itself takes this rank's share.
        """
        return getattr(self.batch_sampler, "rank_sampler", self.batch_sampler)

    @property
    def _index_sampler(self) -> Any:
        # torch's DataLoader iterates (and takes len() of) _index_sampler: this rank's batches.
        if isinstance(self.batch_sampler, AllRanksBatchSampler):
            return self.batch_sampler.rank_sampler
        return super()._index_sampler

    @property
    def resumable_sampler(self) -> ResumableBatchSampler | None:
        """This rank's batch sampler when it can say where it is (stoker datasets' can)."""
        sampler = self.rank_sampler
        return sampler if isinstance(sampler, ResumableBatchSampler) else None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator over torch's
        _warn_if_ranks_disagree(self.rank_sampler)
        resumable = self.resumable_sampler
        consumed = resumable.mark_consumed if resumable is not None else None
        # A batching dataset finishes its batches here, in the main process (uint8 -> float).
        arrive = self.dataset.arrive if isinstance(self.dataset, BatchingDataset) else None
        monitor = self.monitor
        tuning = self._tuning  # live tuning (stoker.autotune): it switches workers between batches
        self._handing_over = 0
        if tuning is not None:
            tuning.start_epoch()
            if tuning.pending is not None:  # decided on the last epoch's last batch
                at = _position(resumable, epoch_start=True)
                tuning.switch(self, epoch=at["epoch"], batch_in_epoch=0, resume_at=None)
            tuning.draining = False  # a hand-over a loop left early ended with that iteration
        timed = monitor is not None or tuning is not None
        clock = monitor.clock if monitor is not None else time.perf_counter
        inner = self._start_workers()
        if monitor is not None:
            monitor.start_epoch()
        index = 0
        asked = 0.0
        switched = False
        old = None  # after a switch: the old iterator, handing over its batches before inner's
        try:
            while True:
                if timed and not switched:  # after a switch, the wait began before it
                    asked = clock()
                switched = False
                source = inner if old is None else old
                try:
                    batch = next(source)
                except StopIteration:
                    if old is not None:  # handed over: the new workers' batches follow
                        self._end_hand_over(old)
                        old = None
                        switched = True
                        continue
                    if tuning is None or not tuning.draining or _epoch_done(resumable):
                        return
                    # Every batch asked for is handed out: continue with the new count.
                    at = _position(resumable)
                    done = at["batch_in_epoch"]
                    tuning.switch(self, epoch=at["epoch"], batch_in_epoch=done, resume_at=done)
                    inner = self._start_workers()
                    switched = True
                    continue
                except (RuntimeError, ConnectionError, EOFError) as err:
                    offset = self._old_offset if source is old else 0
                    raise explain_failure(err, source, self, index, send_offset=offset) from err
                if arrive is not None:  # the conversion is time the training loop waits too
                    batch = arrive(batch)
                got = clock() if timed else 0.0
                if monitor is not None and monitor.record(asked, got, batch_samples(batch)):
                    self._warn_input_bound()
                if isinstance(batch, dict) and batch.get("replaced"):
                    self._record_replaced(batch["replaced"], index)
                if old is not None:
                    self._handing_over -= 1  # counted already: the sampler continues after it
                elif consumed is not None:
                    consumed()
                if tuning is not None and old is None:
                    tuning.observe(self, asked, got, batch)
                    if tuning.pending is not None and not tuning.draining and resumable is not None:
                        old = self._hand_over(inner, resumable)
                        if old is not None:
                            inner = self._start_workers()
                index += 1
                if isinstance(batch, dict) and batch.get("empty"):
                    continue  # every file of the batch failed; they are reported above
                yield batch
        except GeneratorExit:
            if old is not None:
                self._stop_early(old, handing_over=True)
            self._stop_early(inner)
            raise

    def _hand_over(self, inner: Any, sampler: ResumableBatchSampler) -> Any:
        """Switch now, while ``inner`` still hands out what it asked for: the new count's
        iterator continues the epoch after those batches, and its workers start and load
        meanwhile. Returns ``inner`` (to drain first), or ``None`` when the switch waits for the
        hand-over to end (nothing left to ask for in the epoch, or torch does not say what is
        outstanding); either way ``inner`` asks for nothing more.

        Workers have up to ``workers x prefetch_factor`` batches outstanding (more while batches
        wait unread, up to ``in_flight`` and the early ask's bound); the main process
        (0 workers) has none, so a switch from 0 starts the new workers with nothing to overlap.
        Letting the main process load one more batch per new worker meanwhile was measured and
        made it worse (``benchmarks/switch_stall.py --from 0 --to 2``: the loop waits for those
        loads, slowed by the starting workers).
        """
        tuning = self._tuning
        assert tuning is not None and tuning.pending is not None
        tuning.draining = True  # the old count's batches are not timed
        outstanding = torch_internals.outstanding_batches(inner)
        done = _position(sampler)
        torch_internals.stop_asking(inner)
        if (
            _epoch_done(sampler)
            or outstanding is None
            or done["batch_in_epoch"] + outstanding >= len(sampler)
        ):
            return None
        resume_at = done["batch_in_epoch"] + outstanding
        # the old iterator's send index i is batch i - sent of the iteration the sampler runs next
        self._old_offset = -torch_internals.sent_batches(inner)
        self._old_persistent = tuning.switch(
            self,
            epoch=done["epoch"],
            batch_in_epoch=resume_at,
            resume_at=resume_at,
            keep_running=True,
            handing_over=outstanding,
        )
        tuning.draining = True  # switch() ended the pending state; the hand-over goes on
        self._handing_over = outstanding
        return inner

    def _end_hand_over(self, old: Any) -> None:
        """The old iterator handed out everything it asked for: stop its workers if persistent."""
        assert self._tuning is not None
        self._tuning.draining = False
        if self._handing_over != 0:  # every batch asked for arrives; anything else is a bug
            raise RuntimeError(
                f"stoker: a live-tuning switch expected {self._handing_over} more batches from "
                "the old workers; please report this"
            )
        if self._old_persistent is not None:
            torch_internals.shutdown_workers(self._old_persistent)
            self._old_persistent = None

    def _start_workers(self) -> Any:
        """Torch's iterator for this epoch (or the rest of it, after a live-tuning switch)."""
        with _quiet_cpu_advice(self._tuning is not None):
            inner = super().__iter__()
        torch_internals.unwatch_worker_exits(inner)
        cost = getattr(self.dataset, "batch_cost", None)
        self.asks_ahead = False
        if getattr(self.dataset, "dispatch", None) == "least work" and callable(cost):
            ahead = self._ahead_rounds * (self.prefetch_factor or 2) * self.num_workers
            dropped = getattr(self.dataset, "drop", None)
            dispatched = torch_internals.dispatch_by_work(
                inner,
                cost,
                depth=self.in_flight or None,
                ahead=ahead,
                dropped=dropped if callable(dropped) else None,
            )
            self.asks_ahead = dispatched and ahead > 0
        # A weak reference: a loop that breaks early must not keep the workers alive.
        self._live = weakref.ref(inner)
        return inner

    def _stop_early(self, inner: Any, *, handing_over: bool = False) -> None:
        """The loop left mid-epoch: stop non-forked workers only once they are idle.

        With torch 2.13, spawned (and forkserver) workers that are stopped while still making a
        batch abort ("terminate called without an active exception", then "DataLoader worker is
        killed by signal: Aborted" from a later line of the user's program). Idle ones stop
        cleanly, so the few batches already asked for are collected first (at most ``in_flight``
        or workers x prefetch_factor, with the early ask's bound) and nothing more is asked.
        Persistent workers stay for the next epoch.
        ``handing_over``: ``inner`` is the old iterator of a live-tuning switch; it is stopped
        whatever its kind (nothing will ask it for more).
        """
        if handing_over:
            old, self._old_persistent = self._old_persistent, None
            try:
                for _ in inner:
                    pass
            except RuntimeError:
                logger.debug("a worker failed while the loader was stopping early", exc_info=True)
            stop_workers(inner if old is None else old)
            return
        if self.num_workers == 0 or self.persistent_workers or self.start_method() == "fork":
            return
        if not torch_internals.stop_asking(inner):
            return  # this torch cannot be told to stop asking: leave it to its own shutdown
        try:
            for _ in inner:
                pass
        except RuntimeError:
            logger.debug("a worker failed while the loader was stopping early", exc_info=True)
        stop_workers(inner)

    def stats(self) -> LoaderStats:
        """Wait time, wait fraction, throughput and decode errors so far (``LoaderStats``).

        Raises:
            ValueError: the loader was made with ``monitor=False``.
        """
        if self.monitor is None:
            raise ValueError(
                "this loader does not time its batches (made with monitor=False); "
                "use make_loader(..., monitor=True), the default"
            )
        tuning = self._tuning
        return self.monitor.stats(
            workers=self.num_workers,
            decode_problems=tuple(self.decode_problems),
            switches=tuple(tuning.switches) if tuning is not None else (),
            tuning=tuning.reason if tuning is not None else None,
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the workers of the iteration in progress (empty when none are running)."""
        inner = self._live() if self._live is not None else None
        workers = torch_internals.worker_processes(inner)
        return [int(w.pid) for w in workers if w.pid is not None]

    def _warn_input_bound(self) -> None:
        assert self.monitor is not None
        stats = self.stats()
        plan, dataset = self.plan, self.dataset
        batching = dataset if isinstance(dataset, BatchingDataset) else None
        advice = input_bound_advice(
            workers=self.num_workers,
            max_workers=max_useful_workers(plan.budget),
            budget=f"{plan.budget.cpus} CPUs, {plan.budget.source}",
            measured=plan.request.workers == "auto" or self._tuning is not None,
            output=batching.output if batching is not None else None,
            fast_decode=batching.fast_decode if batching is not None else None,
        )
        warn(
            input_bound_message(stats, self.monitor, advice),
            once=False,
            category=InputBoundWarning,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is in its epochs (JSON-able); see the class docstring."""
        state = dict(self._resumable().state_dict())
        if self._handing_over:  # the sampler counts these as done; the training loop has not
            state["batches_done"] = int(state["batches_done"]) - self._handing_over
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of that epoch."""
        self._resumable().load_state_dict(state)
        self._handing_over = 0  # a hand-over left unfinished is replaced by this position

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` (epochs also advance on their own)."""
        self._resumable().set_epoch(epoch)
        self._handing_over = 0

    def _resumable(self) -> ResumableBatchSampler:
        sampler = self.resumable_sampler
        if sampler is None:
            raise TypeError(
                "this loader's batch sampler cannot save its position; resume needs a stoker "
                "dataset (stoker.load_dataset, or any stoker.data.protocol.BatchingDataset) or a "
                "batch sampler that implements stoker.data.protocol.ResumableBatchSampler"
            )
        return sampler

    def start_method(self) -> str:
        """The start method its workers use (``fork``, ``spawn`` or ``forkserver``)."""
        context = self.multiprocessing_context
        if context is not None:
            return str(context.get_start_method())
        return default_start_method()

    def _record_replaced(self, replaced: list[Problem], index: int = 0) -> None:
        if self.monitor is not None:
            # PyTorch hands batch indices to workers round robin, so batch k came from k % n.
            self.monitor.record_errors(index % max(self.num_workers, 1), len(replaced))
        known = self.decode_problems
        for problem in replaced:
            if problem not in known:
                known.append(problem)
                what = (
                    "it was replaced by another image of its bucket"
                    if problem.action == "replaced"
                    else "no other image of its bucket decoded, so its batch is one sample short"
                )
                warn(
                    f"stoker could not decode {problem.path} ({problem.reason}); {what}. Fix or "
                    "remove the file; dataset.report.problems lists it, stoker scan lists bad files.",
                    once=False,
                )


def _transit_room(
    batch_bytes: int, prefetch_factor: int, workers: int, in_flight: int
) -> tuple[int, int]:
    """``(ahead rounds, in flight)``: `torch_internals.AHEAD_ROUNDS` and ``in_flight`` when
    ``/dev/shm`` has room for the batches they add beyond torch's own ``workers x
    prefetch_factor``, twice over (waiting in the main process, and as the workers' spare
    blocks); ``(AHEAD_ROUNDS, 0)`` when it has room for the early ask's batches alone; else
    ``(0, 0)``. A container's default ``/dev/shm`` is 64 MiB, where torch's own batches may be
    all that fits. ``batch_bytes``: the largest batch as it crosses (0: unknown, no check)."""
    rounds = torch_internals.AHEAD_ROUNDS
    if batch_bytes <= 0:
        return rounds, in_flight
    ahead = rounds * prefetch_factor * workers
    deeper = max(0, in_flight - prefetch_factor * workers)
    free = shm_free_bytes()
    if free >= 2 * (ahead + deeper) * batch_bytes:
        return rounds, in_flight
    # room for the early ask's batches alone: keep those (x0.93 against x0.83, issue #11)
    return (rounds, 0) if free >= 2 * ahead * batch_bytes else (0, 0)


@contextlib.contextmanager
def _quiet_cpu_advice(live: bool) -> Iterator[None]:
    """Without torch's advice against more workers than CPUs when tuned ``live``: the tuner runs
    one more than the CPUs only after measuring that the workers left CPU idle
    (`stoker.autotune.rules.SPARE_CPU`), and its reason says so."""
    if not live:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="This DataLoader will create", category=UserWarning
        )
        yield


def build_loader(
    dataset: Any,
    plan: LoaderPlan,
    *,
    seed: int,
    batch_size: int | None = 1,
    shuffle: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    even_batches: Literal["pad", "drop"] = "pad",
    monitor: bool | InputMonitor = True,
    dataloader_kwargs: Mapping[str, Any] | None = None,
    tuning: LiveTuning | None = None,
) -> StokerLoader:
    """The DataLoader for ``dataset`` with ``plan``'s settings: the one place stoker makes one.

    A ``BatchingDataset`` batches itself: its batch sampler (this rank's share, seeded by
    ``seed``) and collate function are used, and ``batch_size``/``shuffle`` are not (said once
    when they differ). Any other dataset goes to DataLoader with ``batch_size`` and ``shuffle``,
    shuffled by a generator seeded with ``seed``. ``dataloader_kwargs`` go to DataLoader as
    they are (a ``batch_sampler`` there replaces the dataset's; the tuner passes its own).
    """
    kwargs = dict(dataloader_kwargs or {})
    generator = torch.Generator()
    generator.manual_seed(seed)
    worker_init = WorkerInit(seed, kwargs.pop("worker_init_fn", None))
    if isinstance(dataset, BatchingDataset):
        if dataset.seed != seed:
            dataset = dataset.with_seed(seed)
        if "batch_sampler" not in kwargs:
            env_rank, env_world = distributed_ranks()
            rank_sampler = dataset.make_batch_sampler(
                seed=seed,
                shuffle=shuffle,
                rank=env_rank if rank is None else rank,
                world_size=env_world if world_size is None else world_size,
                even_batches=even_batches,
            )
            kwargs["batch_sampler"] = AllRanksBatchSampler(rank_sampler)
            _tell_batch_size_ignored(batch_size, dataset)
        kwargs.setdefault("collate_fn", dataset.collate_fn)
        batch_size, shuffle = 1, False
        if plan.num_workers > 0:
            if plan.pin_memory and getattr(dataset, "float_transit", None) == "blocks":
                # torch's pin thread copies each batch before `arrive` sees it, so blocks lent
                # to the loop would never come back: float batches cross as uint8 instead
                dataset = dataset.with_seed(seed)
                dataset.float_transit = "uint8"
            dataset = dataset.for_workers()  # e.g. float batches cross the queue as uint8
    prefetch = plan.prefetch_factor or 2
    # the live tuner may go one worker above, or start workers on a loader built without any
    ahead_rounds, in_flight = _transit_room(
        getattr(dataset, "transit_batch_bytes", 0),
        prefetch,
        max(plan.num_workers, 1) + 1,
        # a prefetch_factor the user gave is the depth they asked for
        torch_internals.IN_FLIGHT if plan.request.prefetch_factor is None else 0,
    )
    # a worker's share of the batches kept in flight beyond torch's prefetch_factor each
    workers = max(plan.num_workers, 1)
    deeper = -(-max(0, in_flight - prefetch * workers) // workers)
    if plan.num_workers > 0 and getattr(dataset, "float_in_blocks", False):
        # blocks for the deeper queue too, besides the loop's share (FLOAT_BLOCKS)
        dataset.shared_blocks.blocks += max(0, prefetch - 2) + deeper
    if plan.num_workers > 0 and isinstance(dataset, BatchingDataset):
        blocks, arrived = getattr(dataset, "shared_blocks", None), getattr(dataset, "arrived", None)
        if (
            blocks is not None
            and getattr(dataset, "uint8_in_transit", False)
            and not plan.pin_memory
        ):
            # blocks for a worker's share of the batches that wait ahead of their turn; made
            # only when used. 4 blocks measured x0.89, 8 x0.93 at 2 workers (issue #11).
            # Not with pinning: torch's pin thread copies each batch, so none comes back.
            blocks.blocks += ahead_rounds * prefetch + deeper
        elif blocks is not None and getattr(dataset, "uint8_in_transit", False):
            # pinned: no block would come back (the worker dropped them after 2 x 4 refused
            # loans); none at all, so the memory rules count none either
            blocks.blocks = 0
        if blocks is not None and arrived is not None:
            # the main process keeps every worker's blocks mapped (one more worker: the live
            # tuner may go there), or a block mapped again costs its page faults again
            arrived.keep = max(arrived.keep, (plan.num_workers + 1) * blocks.blocks)
    with _quiet_cpu_advice(tuning is not None):
        loader = StokerLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            worker_init_fn=worker_init,
            **plan.kwargs,  # type: ignore[arg-type]  # validated by the planner
            **kwargs,
        )
    loader.plan = plan
    loader.seed = seed
    loader._tuning = tuning
    loader._ahead_rounds = ahead_rounds
    loader.in_flight = in_flight
    # A stoker dataset's list, shared, so dataset.decode_problems sees them too.
    loader.decode_problems = dataset.decode_problems if isinstance(dataset, BatchingDataset) else []
    if monitor is True:
        loader.monitor = InputMonitor()
    elif isinstance(monitor, InputMonitor):
        loader.monitor = monitor
    return loader


def distributed_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group when there is one (Lightning starts
    it before ``train_dataloader()``), else ``distributed_from_env``."""
    group = _process_group() if environ is None else None
    return group if group is not None else distributed_from_env(environ)


def _process_group() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _warn_if_ranks_disagree(sampler: Any) -> None:
    """Warn once when the loader was sharded for other ranks than the running process group."""
    group = _process_group()
    mine = (getattr(sampler, "rank", None), getattr(sampler, "world_size", None))
    if group is None or mine[1] is None or mine == group:
        return
    warn(
        f"this loader was made for rank {mine[0]} of {mine[1]}, but torch.distributed runs "
        f"rank {group[0]} of {group[1]}, so ranks will load overlapping or missing data. Make "
        "the loader after the process group starts (with Lightning: in train_dataloader()), "
        "or pass make_loader(..., rank=, world_size=)"
    )


def _tell_batch_size_ignored(batch_size: int | None, dataset: BatchingDataset) -> None:
    """stoker datasets batch with their config's sizes; say so when the caller asked otherwise."""
    sizes = dataset.batch_sizes_in_use()
    if batch_size in (None, 1) or sizes == [batch_size]:
        return
    tell(
        [
            Adjustment(
                setting="batch_size",
                requested=batch_size,
                chosen=sizes[0] if len(sizes) == 1 else sizes,
                reason="a stoker dataset batches by bucket with each dataset's batch_size from its "
                "config; set batch_size there (load_dataset(..., batch_size=N) applies where the "
                "config leaves it unset)",
            )
        ]
    )


def _position(sampler: Any, *, epoch_start: bool = False) -> dict[str, int]:
    """Where the run is, for a live-tuning switch's record: the epoch and its batches handed out."""
    state = sampler.state_dict()
    done = 0 if epoch_start else int(state["batches_done"])
    return {"epoch": int(state["epoch"]), "batch_in_epoch": done}


def _epoch_done(sampler: Any) -> bool:
    """Whether the epoch in progress is finished: its sampler reports the next one's start (at
    least one batch of it was handed out, or no switch would be under way)."""
    return int(sampler.state_dict()["batches_done"]) == 0
