"""Memory: what workers may use (meminfo and cgroup limits) and what a process uses (smaps_rollup).

The available memory is ``MemAvailable`` of ``/proc/meminfo``, lowered to what the cgroup's
``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) leaves, of this group and every ancestor;
``MEMORY_HEADROOM = 0.8`` of it may go to workers (the rest stays for the training process and the
page cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stoker.system.procfs import (
    cgroup_ancestors,
    cgroup_membership,
    cgroup_mounts,
    parse_proc_fields,
    read_text,
    shown,
)

__all__ = [
    "MEMORY_HEADROOM",
    "MemoryBudget",
    "MemoryUse",
    "child_pids",
    "memory_budget",
    "read_memory",
    "worker_uss_bytes",
]

MEMORY_HEADROOM = 0.8


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryBudget:
    """The memory workers may use.

    Attributes:
        available_bytes: memory available now (``None`` where it cannot be read).
        usable_bytes: ``MEMORY_HEADROOM`` of it: what workers may take.
        source: where the binding figure was read, e.g. ``/proc/meminfo MemAvailable``.
    """

    available_bytes: int | None
    usable_bytes: int | None
    source: str


def memory_budget(*, root: str | os.PathLike[str] = "/") -> MemoryBudget:
    """The memory available to workers now (see the module docstring); ``root`` holds ``proc``."""
    base = Path(root)
    found: list[tuple[int, str]] = []
    meminfo = parse_proc_fields(read_text(base / "proc/meminfo") or "")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "/proc/meminfo MemAvailable"))
    found += _cgroup_memory_left(base)
    if not found:
        return MemoryBudget(available_bytes=None, usable_bytes=None, source="unknown")
    available, source = min(found)
    return MemoryBudget(
        available_bytes=available,
        usable_bytes=int(available * MEMORY_HEADROOM),
        source=source,
    )


def _cgroup_memory_left(base: Path) -> list[tuple[int, str]]:
    """(limit - usage, file) for each cgroup level with a memory limit, v2 and v1."""
    v2_path, v1_paths = cgroup_membership(base)
    v2_mount, v1_mounts = cgroup_mounts(base)
    found = []
    if v2_path is not None and v2_mount is not None:
        for folder in cgroup_ancestors(v2_path, v2_mount, base):
            left = _limit_left(folder / "memory.max", folder / "memory.current")
            if left is not None:
                found.append((left, shown(folder / "memory.max", base)))
    v1_path, v1_mount = v1_paths.get("memory"), v1_mounts.get("memory")
    if v1_path is not None and v1_mount is not None:
        for folder in cgroup_ancestors(v1_path, v1_mount, base):
            left = _limit_left(folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes")
            if left is not None:
                found.append((left, shown(folder / "memory.limit_in_bytes", base)))
    return found


def _limit_left(limit_path: Path, usage_path: Path) -> int | None:
    limit_text, usage_text = read_text(limit_path), read_text(usage_path)
    if limit_text is None or limit_text.strip() == "max":
        return None
    try:
        limit = int(limit_text.strip())
        usage = int((usage_text or "0").strip())
    except ValueError:
        return None
    if limit >= 2**60:  # cgroup v1 writes "no limit" as a huge page-aligned number
        return None
    return max(limit - usage, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryUse:
    """One process's memory, from ``/proc/<pid>/smaps_rollup``.

    Attributes:
        pid: the process.
        rss_bytes: resident pages, shared or not.
        pss_bytes: proportional set size: each shared page divided by the processes sharing it.
        uss_bytes: unique set size: ``Private_Clean + Private_Dirty``.
    """

    pid: int
    rss_bytes: int
    pss_bytes: int
    uss_bytes: int


def read_memory(pid: int | str = "self", *, proc_root: Path = Path("/proc")) -> MemoryUse | None:
    """``MemoryUse`` of ``pid`` (``"self"`` for this process), or ``None`` when it cannot be read.

    A process that has exited, a kernel without ``smaps_rollup`` (before Linux 4.14) or a
    ``/proc`` hidden by permissions give ``None``: a measurement without memory, not an error.
    """
    fields = parse_proc_fields(read_text(proc_root / str(pid) / "smaps_rollup") or "")
    if "Rss" not in fields or "Pss" not in fields:
        return None
    real_pid = os.getpid() if pid == "self" else int(pid)
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return MemoryUse(pid=real_pid, rss_bytes=fields["Rss"], pss_bytes=fields["Pss"], uss_bytes=uss)


def worker_uss_bytes(pids: Sequence[int], proc_root: Path = Path("/proc")) -> int | None:
    """The largest USS among ``pids``; ``None`` when none can be read."""
    sizes = []
    for pid in pids:
        fields = parse_proc_fields(read_text(proc_root / str(pid) / "smaps_rollup") or "")
        if "Private_Clean" in fields or "Private_Dirty" in fields:
            sizes.append(fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0))
    return max(sizes) if sizes else None


def child_pids(proc_root: Path = Path("/proc"), parent: int | None = None) -> set[int]:
    """Processes whose parent is ``parent`` (default: this one), from ``/proc/<pid>/stat``.

    multiprocessing's helper processes (resource tracker, fork server) are left out: they are
    not workers.
    """
    parent = os.getpid() if parent is None else parent
    found: set[int] = set()
    try:
        entries = [e for e in os.listdir(proc_root) if e.isdigit()]
    except OSError:
        return found
    for entry in entries:
        try:
            stat = (proc_root / entry / "stat").read_text(encoding="ascii", errors="replace")
            cmdline = (proc_root / entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        helper = b"resource_tracker" in cmdline or b"forkserver" in cmdline
        if len(fields) > 1 and fields[1] == str(parent) and not helper:
            found.add(int(entry))
    return found
