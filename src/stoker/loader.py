"""Build a real ``torch.utils.data.DataLoader`` from a plan; the only module that constructs one.

``plan_loader`` reads what the platform offers (CUDA, start methods, the CPU budget), plans, and
tells each change once per process as a ``StokerWarning`` and on the ``stoker`` logger.
``make_loader`` builds the DataLoader from that plan, with deterministic worker seeds.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader

from stoker.budget import Budget, cpu_budget
from stoker.errors import SharedMemoryFull, StokerWarning, WorkerFailed
from stoker.plan import Adjustment, LoaderPlan, LoaderRequest, make_plan

__all__ = ["StokerLoader", "make_loader", "plan_loader"]

logger = logging.getLogger("stoker")

# Adjustments already told in this process: warn once, not once per epoch or per loader.
_told: set[tuple[str, str, str, str]] = set()

# DataLoader's own names for the settings stoker plans, accepted by make_loader as aliases so
# code written for DataLoader ports over unchanged.
_ALIASES = {
    "num_workers": "workers",
    "persistent_workers": "persistent",
    "multiprocessing_context": "start_method",
}


def tell(adjustments: Iterable[Adjustment]) -> None:
    """Warn about each adjustment once per process (``StokerWarning``) and log it."""
    for adj in adjustments:
        key = (adj.setting, repr(adj.requested), repr(adj.chosen), adj.reason)
        if key in _told:
            continue
        _told.add(key)
        message = (
            f"stoker changed {adj.setting} from {adj.requested!r} to {adj.chosen!r}: {adj.reason}"
        )
        logger.warning(message)
        warnings.warn(message, StokerWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside stoker, so warnings point at the user's line."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("stoker"):
        frame = frame.f_back
        level += 1
    return level


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not stop data loading
        return False


def plan_loader(
    *,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    budget: Budget | int | None = None,
    warn: bool = True,
) -> LoaderPlan:
    """Plan DataLoader settings that are always valid on this machine (rules: ``stoker.plan``).

    Args are ``LoaderRequest``'s fields; ``budget`` is a ``Budget``, a CPU count, or ``None`` to
    measure it with ``cpu_budget()``. With ``warn`` each change is told once per process.

    Raises:
        ValueError: a setting has no safe meaning (``workers="eight"``, ``prefetch_factor=-1``).
    """
    request = LoaderRequest(
        workers=workers,
        persistent=persistent,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=start_method,
    )
    return plan_request(request, budget=budget, warn=warn)


def plan_request(
    request: LoaderRequest, *, budget: Budget | int | None = None, warn: bool = True
) -> LoaderPlan:
    """``plan_loader`` for a ready ``LoaderRequest``."""
    if budget is None:
        budget = cpu_budget()
    elif not isinstance(budget, Budget):
        budget = Budget.fixed(budget)
    methods = torch.multiprocessing.get_all_start_methods()
    plan = make_plan(
        request,
        budget,
        cuda_available=_cuda_available(),
        start_methods=methods,
        default_start_method=methods[0] if methods else None,
    )
    if warn:
        tell(plan.adjustments)
    for note in plan.defaults:
        logger.debug("stoker chose %s", note)
    return plan


def distributed_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun/accelerate's ``RANK`` and ``WORLD_SIZE``; else (0, 1)."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        return 0, 1
    return rank, world_size


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
    """

    plan: LoaderPlan
    seed: int

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        consumed = getattr(sampler, "mark_consumed", None)
        inner = super().__iter__()
        while True:
            try:
                batch = next(inner)
            except StopIteration:
                return
            except RuntimeError as err:
                raise _explain_failure(err, inner, self) from err
            if isinstance(batch, dict) and batch.get("replaced"):
                self._record_replaced(batch["replaced"])
            if consumed is not None:
                consumed()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is in its epochs (JSON-able); see the class docstring."""
        return dict(self._resumable().state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of that epoch."""
        self._resumable().load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch`` (epochs also advance on their own)."""
        self._resumable().set_epoch(epoch)

    def _resumable(self) -> Any:
        sampler = self.batch_sampler
        if not callable(getattr(sampler, "state_dict", None)):
            raise TypeError(
                "this loader's batch sampler cannot save its position; resume needs a stoker "
                "dataset (stoker.load_dataset) or a batch_sampler with state_dict()"
            )
        return sampler

    def _record_replaced(self, replaced: list[tuple[str, str]]) -> None:
        from stoker.data.catalog import Problem

        known = getattr(self.dataset, "decode_problems", None)
        for path, reason in replaced:
            problem = Problem(path=path, reason=reason, stage="decode", action="replaced")
            if isinstance(known, list) and problem not in known:
                known.append(problem)
                message = (
                    f"stoker could not decode {path} ({reason}); it was replaced by another "
                    "image of its bucket. Fix or remove the file; stoker scan lists bad files."
                )
                logger.warning(message)
                warnings.warn(message, StokerWarning, stacklevel=2)


def make_loader(
    dataset: Any,
    *,
    batch_size: int | None = 1,
    shuffle: bool = False,
    workers: int | Literal["auto"] | None = None,
    persistent: bool | None = None,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
    timeout: float = 0,
    start_method: str | None = None,
    seed: int | None = None,
    budget: Budget | int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    even_batches: Literal["pad", "drop"] = "pad",
    **dataloader_kwargs: Any,
) -> StokerLoader:
    """Build a DataLoader for ``dataset`` from a plan that is valid on this machine.

    Settings are planned by ``plan_loader`` (changes are warned once). ``seed`` fixes the shuffle
    and every worker's ``random``/NumPy/torch seeds; ``None`` draws one, kept as ``loader.seed``.
    DataLoader's own names ``num_workers``, ``persistent_workers`` and ``multiprocessing_context``
    are accepted as aliases; other keyword arguments go to DataLoader unchanged.

    For stoker datasets (``load_dataset``) the dataset batches by bucket with the config's batch
    sizes, and ``rank``/``world_size`` (default: ``RANK``/``WORLD_SIZE`` set by torchrun or
    accelerate, else one process) shard whole batches across ranks: each rank gets the same
    number of batches per epoch; ``even_batches`` says whether the remainder is padded with
    batches from the start of the epoch (``"pad"``) or dropped (``"drop"``).
    """
    settings: dict[str, Any] = {
        "workers": workers,
        "persistent": persistent,
        "start_method": start_method,
    }
    for alias, name in _ALIASES.items():
        if alias in dataloader_kwargs:
            value = dataloader_kwargs.pop(alias)
            if settings[name] is not None:
                raise ValueError(f"give either {name}= or {alias}=, not both")
            settings[name] = value
    if seed is None:
        seed = getattr(dataset, "seed", None)
        seed = secrets.randbits(63) if seed is None else seed
    plan = plan_loader(
        workers=settings["workers"],
        persistent=settings["persistent"],
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        timeout=timeout,
        start_method=settings["start_method"],
        budget=budget,
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    worker_init = WorkerInit(seed, dataloader_kwargs.pop("worker_init_fn", None))
    if callable(getattr(dataset, "make_batch_sampler", None)):
        # stoker datasets batch by bucket themselves; batch_size and shuffle go to their sampler.
        if getattr(dataset, "seed", seed) != seed:
            dataset = dataset.with_seed(seed)
        env_rank, env_world = distributed_from_env()
        dataloader_kwargs.setdefault(
            "batch_sampler",
            dataset.make_batch_sampler(
                seed=seed,
                shuffle=shuffle,
                rank=env_rank if rank is None else rank,
                world_size=env_world if world_size is None else world_size,
                even_batches=even_batches,
            ),
        )
        dataloader_kwargs.setdefault("collate_fn", dataset.collate_fn)
        batch_size, shuffle = 1, False
    loader = StokerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        worker_init_fn=worker_init,
        **plan.kwargs,
        **dataloader_kwargs,
    )
    loader.plan = plan
    loader.seed = seed
    return loader


_DEAD_WORKER = re.compile(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\)(.*)")
_SHM_SIGNS = (
    "No space left on device",
    "/dev/shm",
    "unable to write to file </torch_",
    "shared memory",
)


def _explain_failure(err: RuntimeError, inner: Any, loader: StokerLoader) -> Exception:
    """Turn PyTorch's worker-failure errors into ones that say which worker, what, and the fix."""
    text = str(err)
    if any(sign in text for sign in _SHM_SIGNS):
        _shutdown(inner)
        return SharedMemoryFull(
            f"workers could not hand batches to the main process: shared memory is full ({text}). "
            "Give the container more (docker run --shm-size=8g), or use fewer workers, a smaller "
            "prefetch_factor, or output='uint8' (4x fewer bytes per batch)."
        )
    match = _DEAD_WORKER.search(text)
    if match is None:
        return err
    pids = {int(p) for p in re.findall(r"\d+", match.group(1))}
    workers = list(getattr(inner, "_workers", []))
    ids = [i for i, w in enumerate(workers) if getattr(w, "pid", None) in pids]
    loading = _what_workers_loaded(inner, loader, set(ids))
    _shutdown(inner)
    how = match.group(2).strip(" .") or "exited unexpectedly"
    who = ", ".join(f"worker {i}" for i in ids) or "a worker"
    return WorkerFailed(
        f"DataLoader {who} (pid {', '.join(map(str, sorted(pids)))}) died: {how}. "
        f"It was loading: {loading}. The usual cause is the out-of-memory killer (see dmesg): "
        f"use fewer workers than {loader.num_workers}, a smaller prefetch_factor, or "
        "output='uint8'. The run can resume from loader.state_dict() saved before the failure."
    )


def _what_workers_loaded(inner: Any, loader: StokerLoader, worker_ids: set[int]) -> str:
    """The samples outstanding at the given workers, as image paths when the dataset has them."""
    tasks = getattr(inner, "_task_info", {})
    sampler = loader.batch_sampler
    batch_of = getattr(sampler, "batch_of_iteration", None)
    paths = getattr(getattr(loader.dataset, "catalog", None), "paths", None)
    found: list[str] = []
    for send_index, info in sorted(tasks.items()):
        if len(info) != 1 or info[0] not in worker_ids:
            continue  # already returned, or another worker's
        batch = batch_of(send_index) if callable(batch_of) else None
        if batch is None:
            found.append(f"batch {send_index} of this epoch")
        elif paths is not None:
            found += [paths[int(key[2])] for key in batch]
        else:
            found.append(repr(list(batch)))
    return ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "") or (
        "nothing identifiable"
    )


def _shutdown(inner: Any) -> None:
    """Stop the remaining workers now, so none is left behind as a zombie."""
    stop = getattr(inner, "_shutdown_workers", None)
    if callable(stop):
        try:
            stop()
        except Exception:  # shutting down after a failure must not hide the failure
            logger.debug("worker shutdown after a failure raised", exc_info=True)
