"""The remembered choice: a JSON file per (dataset, budget, request, versions) under ``cache_dir()``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stoker import version
from stoker.data.inputs import UnusableFile, read_bounded
from stoker.files import atomic_write_text
from stoker.plan import LoaderRequest, MeasuredChoice, Measurement
from stoker.system.cpu import Budget
from stoker.system.memory import MemoryBudget
from stoker.warn import warn

__all__ = [
    "CACHE_FORMAT",
    "cache_dir",
    "cache_key",
    "cache_path",
    "fits",
    "read_cache",
    "remember",
    "remembered",
]

CACHE_FORMAT = 1


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where stoker remembers things: ``STOKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/stoker``, else
    ``~/.cache/stoker``. The one function that reads these variables."""
    env = os.environ if environ is None else environ
    if env.get("STOKER_CACHE_DIR"):
        return Path(env["STOKER_CACHE_DIR"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "stoker"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".cache" / "stoker"


def cache_key(
    fingerprint: str,
    request: LoaderRequest,
    budget: Budget,
    consumer_rate: float | None,
    batch_size: int | None,
) -> dict[str, Any]:

    return {
        "stoker": version.__version__,
        "torch": torch.__version__,
        "dataset": fingerprint,
        "budget": {"cpus": budget.cpus, "node_cpus": budget.node_cpus, "ranks": budget.local_ranks},
        "request": dataclasses.asdict(request),
        "consumer_rate": consumer_rate,
        "batch_size": batch_size,
    }


def cache_path(folder: Path, key: Mapping[str, Any]) -> Path:
    text = json.dumps(key, sort_keys=True)
    return folder / "tune" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def read_cache(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The remembered record for ``key``, or None; a corrupt file is ignored with one warning."""
    try:
        data = json.loads(read_bounded(path, _CACHE_LIMIT_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnusableFile, ValueError, RecursionError) as err:
        _ignore_cache(path, str(err) or type(err).__name__)
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
        return None  # another format or another question: measured again, file replaced
    try:
        choice = choice_from(data)
        memory = data.get("worker_memory_bytes")
        valid = (
            type(data["choice"]["workers"]) is int
            and 0 <= choice.workers <= _MOST_WORKERS
            and (choice.prefetch_factor is None or _positive_int(choice.prefetch_factor))
            and (memory is None or (type(memory) is int and memory >= 0))
        )
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as err:
        _ignore_cache(path, f"{type(err).__name__}: {err}")
        return None
    if not valid:
        _ignore_cache(path, "a worker count, prefetch factor or memory size out of range")
        return None
    return data


_CACHE_LIMIT_BYTES = 1 << 24  # a record is a few kB; anything near this is not ours
_MOST_WORKERS = 1024  # far above any CPU budget; a larger cached count is corrupt


def _positive_int(value: object) -> bool:
    return type(value) is int and value >= 1


def _ignore_cache(path: Path, why: str) -> None:
    warn(f"ignored the tuning cache {path} ({why}); measuring again and replacing it", once=False)


def choice_from(data: Mapping[str, Any]) -> MeasuredChoice:
    raw = data["choice"]
    return MeasuredChoice(
        workers=int(raw["workers"]),
        prefetch_factor=raw["prefetch_factor"],
        reason=str(raw["reason"]),
        measurements=tuple(Measurement(**m) for m in raw["measurements"]),
    )


def fits(data: Mapping[str, Any], memory: MemoryBudget) -> bool:
    """Whether a remembered choice still fits the memory available now."""
    per_worker = data.get("worker_memory_bytes")
    workers = int(data["choice"]["workers"])
    if per_worker is None or memory.usable_bytes is None or workers == 0:
        return True
    return bool(workers * int(per_worker) <= memory.usable_bytes)


def remembered(data: Mapping[str, Any], path: Path) -> MeasuredChoice:
    choice = choice_from(data)
    note = f" (remembered from a probe on {data.get('created', '?')}: {path})"
    return dataclasses.replace(choice, reason=choice.reason + note)


def remember(path: Path, record: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    except OSError as err:
        message = (
            f"stoker could not remember the measured loader settings in {path} ({err}); the next "
            "run measures again. Set STOKER_CACHE_DIR to a writable folder."
        )
        warn(message)
