"""The real CPU budget of this process: every limit that applies, the one that binds, and why.

Checked, in this order (the smallest limit wins, unless ``STOKER_CPUS`` overrides them all):

- ``os``: ``os.cpu_count()`` (a ``None`` answer is recorded and ignored);
- ``affinity``: the CPUs this process may run on (``sched_getaffinity``, e.g. ``taskset -c 0``);
- ``cgroup_v2``: ``cpu.max`` of the process's own cgroup and of every ancestor up to the root;
  the lowest quota wins, because a parent's quota caps all its children;
- ``cgroup_v1``: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` along the same path (``-1`` = none);
- ``slurm``: ``SLURM_CPUS_PER_TASK``;
- ``python``: ``PYTHON_CPU_COUNT`` (Python 3.13's override of ``os.cpu_count()``);
- ``override``: ``STOKER_CPUS``, which wins over everything above and says so.

Fractional quotas are rounded **down** (``cpu.max 150000 100000`` = 1.5 CPUs gives 1): running more
busy processes than the quota allows gets the whole group throttled, training loop included. The
budget is never below 1.

Under ``torchrun`` or accelerate, ``LOCAL_WORLD_SIZE`` ranks share the node: each rank's budget is the
node budget divided by the local ranks, rounded down, never below 1. ``STOKER_CPUS`` is read as the
budget of *this* process and is not divided again.

This module imports no torch and changes nothing; every OS touchpoint is a parameter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import ConfigError
from stoker.system.procfs import (
    cgroup_ancestors,
    cgroup_membership,
    cgroup_mounts,
    parse_stat_cpu_ticks,
    read_text,
    shown,
)

__all__ = ["Budget", "Limit", "cpu_budget", "process_cpu_seconds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One source of a CPU limit, as found.

    Attributes:
        kind: ``os``, ``affinity``, ``cgroup_v2``, ``cgroup_v1``, ``slurm``, ``python``, ``override``
            or ``ranks``.
        cpus: the CPUs this limit allows (may be fractional for quotas); ``None`` when the source sets
            no limit or its value was ignored.
        raw: the value as read, e.g. ``"150000 100000"``.
        where: the file or variable it was read from.
        detail: one sentence on how it was read or why it was ignored.
    """

    kind: str
    cpus: float | None
    raw: str
    where: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """The CPUs this process may keep busy.

    Attributes:
        cpus: CPUs for this rank (int >= 1): the node budget shared among local ranks.
        node_cpus: CPUs for the whole node (or container) before sharing among ranks.
        local_ranks: processes on this node sharing ``node_cpus`` (``LOCAL_WORLD_SIZE``, else 1).
        source: a short phrase naming the limit that bound the result.
        limits: every limit that was checked, in the order checked.
    """

    cpus: int
    node_cpus: int
    local_ranks: int = 1
    source: str
    limits: tuple[Limit, ...] = ()

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.node_cpus < 1 or self.local_ranks < 1:
            raise ValueError(f"a Budget needs cpus, node_cpus and local_ranks >= 1, got {self}")

    @classmethod
    def fixed(cls, cpus: int) -> Budget:
        """A budget of ``cpus`` CPUs given by the caller (for tests and explicit planning)."""
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"budget must be a whole number of CPUs >= 1, got {cpus!r}")
        limit = Limit(
            kind="given",
            cpus=float(cpus),
            raw=str(cpus),
            where="argument",
            detail=f"{cpus} CPU{'' if cpus == 1 else 's'} given by the caller",
        )
        return cls(
            cpus=cpus,
            node_cpus=cpus,
            source=f"given {cpus} CPU{'' if cpus == 1 else 's'}",
            limits=(limit,),
        )

    @property
    def binding(self) -> Limit | None:
        """The limit that set the node budget (``None`` only when no limit was found)."""
        return _binding(self.limits)


def cpu_budget(
    *,
    root: str | os.PathLike[str] = "/",
    environ: Mapping[str, str] | None = None,
    affinity: Set[int] | None = None,
    cpu_count: Callable[[], int | None] = os.cpu_count,
) -> Budget:
    """Measure the CPU budget of this process (see the module docstring for the rules).

    Args:
        root: the folder holding ``proc`` and ``sys``; tests pass a fake tree.
        environ: the environment; defaults to ``os.environ``.
        affinity: the set of allowed CPUs; defaults to ``os.sched_getaffinity(0)`` where it exists.
        cpu_count: returns the OS CPU count (``None`` when unknown).

    Raises:
        ConfigError: ``STOKER_CPUS`` is set but is not a whole number >= 1.
    """
    env = os.environ if environ is None else environ
    base = Path(root)
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    limits = [_os_limit(cpu_count())]
    if affinity is not None:
        limits.append(
            Limit(
                kind="affinity",
                cpus=float(len(affinity)),
                raw=_cpu_list(affinity),
                where="sched_getaffinity",
                detail=f"{len(affinity)} CPU{'' if len(affinity) == 1 else 's'} allowed",
            )
        )
    limits += _cgroup_limits(base)
    for name, kind in (("SLURM_CPUS_PER_TASK", "slurm"), ("PYTHON_CPU_COUNT", "python")):
        found = _env_limit(env, name, kind)
        if found is not None:
            limits.append(found)
    ranks, ranks_limit = _local_ranks(env)
    if ranks_limit is not None:
        limits.append(ranks_limit)
    override = _override(env)
    if override is not None:
        limits.append(override)
        return Budget(
            cpus=int(override.cpus or 1),
            node_cpus=int(override.cpus or 1) * ranks,
            local_ranks=ranks,
            source=f"STOKER_CPUS={override.raw} (override)",
            limits=tuple(limits),
        )
    return _combine(tuple(limits), ranks)


def _combine(limits: tuple[Limit, ...], ranks: int) -> Budget:
    bound = _binding(limits)
    node = max(1, math.floor(bound.cpus)) if bound is not None and bound.cpus else 1
    source = _describe(bound) if bound is not None else "no limit found; assuming 1 CPU"
    cpus = max(1, node // ranks)
    if ranks > 1:
        source = f"{source}, shared by {ranks} local ranks: {cpus} each"
    return Budget(cpus=cpus, node_cpus=node, local_ranks=ranks, source=source, limits=limits)


def _binding(limits: tuple[Limit, ...]) -> Limit | None:
    usable = [lim for lim in limits if lim.cpus is not None and lim.kind != "ranks"]
    for lim in usable:
        if lim.kind == "override":
            return lim
    # min() keeps the first of equal limits, so the cheaper, more familiar source is named.
    return min(usable, key=lambda lim: lim.cpus or 0.0, default=None)


def _describe(limit: Limit) -> str:
    cpus = limit.cpus or 0.0
    amount = f"{cpus:g} CPU" + ("" if cpus == 1 else "s")
    names = {
        "os": "os.cpu_count()",
        "affinity": "CPU affinity",
        "cgroup_v2": "cgroup v2 cpu.max",
        "cgroup_v1": "cgroup v1 cpu.cfs_quota_us",
        "slurm": "SLURM_CPUS_PER_TASK",
        "python": "PYTHON_CPU_COUNT",
        "given": "given",
    }
    return f"{names.get(limit.kind, limit.kind)} {amount}"


def _os_limit(count: int | None) -> Limit:
    if count is None or count < 1:
        return Limit(
            kind="os",
            cpus=None,
            raw=str(count),
            where="os.cpu_count()",
            detail="os.cpu_count() could not tell; ignored",
        )
    return Limit(
        kind="os",
        cpus=float(count),
        raw=str(count),
        where="os.cpu_count()",
        detail=f"{count} CPU{'' if count == 1 else 's'} reported by the OS",
    )


def _cpu_list(cpus: Set[int]) -> str:
    ordered = sorted(cpus)
    return ",".join(str(c) for c in ordered[:16]) + ("..." if len(ordered) > 16 else "")


def _parse_positive_int(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def _env_limit(env: Mapping[str, str], name: str, kind: str) -> Limit | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = _parse_positive_int(raw)
    if value is None:
        return Limit(
            kind=kind,
            cpus=None,
            raw=raw,
            where=name,
            detail=f"ignored: {name}={raw!r} is not a whole number >= 1",
        )
    return Limit(kind=kind, cpus=float(value), raw=raw, where=name, detail=f"{name}={value}")


def _override(env: Mapping[str, str]) -> Limit | None:
    raw = env.get("STOKER_CPUS")
    if raw is None or raw.strip() == "":
        return None
    value = _parse_positive_int(raw)
    if value is None:
        raise ConfigError(
            f"STOKER_CPUS={raw!r} is not a whole number of CPUs >= 1; "
            "set it to the CPUs this process may use (for example STOKER_CPUS=4) or unset it"
        )
    return Limit(
        kind="override",
        cpus=float(value),
        raw=raw,
        where="STOKER_CPUS",
        detail=f"STOKER_CPUS={value} overrides every other limit",
    )


def _local_ranks(env: Mapping[str, str]) -> tuple[int, Limit | None]:
    raw = env.get("LOCAL_WORLD_SIZE")
    if raw is None or raw.strip() == "":
        return 1, None
    value = _parse_positive_int(raw)
    if value is None:
        return 1, Limit(
            kind="ranks",
            cpus=None,
            raw=raw,
            where="LOCAL_WORLD_SIZE",
            detail=f"ignored: LOCAL_WORLD_SIZE={raw!r} is not a whole number >= 1",
        )
    return value, Limit(
        kind="ranks",
        cpus=None,
        raw=raw,
        where="LOCAL_WORLD_SIZE",
        detail=f"{value} ranks on this node share its CPUs",
    )


# --- cgroups -------------------------------------------------------------------------------------


def parse_cpu_max(text: str) -> float | None:
    """Parse cgroup v2 ``cpu.max`` (``"$MAX $PERIOD"``): CPUs allowed, or ``None`` for ``max``.

    Raises:
        ValueError: the text is not of that form, or the period is zero.
    """
    parts = text.split()
    if len(parts) not in (1, 2):
        raise ValueError(f"expected '$MAX $PERIOD', got {text.strip()!r}")
    if parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) == 2 else 100_000
    if period <= 0 or quota <= 0:
        raise ValueError(f"quota and period must be positive, got {text.strip()!r}")
    return quota / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """Parse cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; ``None`` for ``-1``."""
    quota_us = int(quota_text.strip())
    if quota_us < 0:
        return None
    period_us = int(period_text.strip())
    if period_us <= 0 or quota_us == 0:
        raise ValueError(f"quota {quota_us} with period {period_us} is not a usable quota")
    return quota_us / period_us


def _cgroup_limits(base: Path) -> list[Limit]:
    v2_path, v1_paths = cgroup_membership(base)
    v2_mount, v1_mounts = cgroup_mounts(base)
    limits: list[Limit] = []
    if v2_path is not None and v2_mount is not None:
        limits += _v2_limits(cgroup_ancestors(v2_path, v2_mount, base), base)
    cpu_path, v1_mount = v1_paths.get("cpu"), v1_mounts.get("cpu")
    if cpu_path is not None and v1_mount is not None:
        limits += _v1_limits(cgroup_ancestors(cpu_path, v1_mount, base), base)
    return limits


def _v2_limits(folders: list[Path], base: Path) -> list[Limit]:
    limits = []
    for folder in folders:
        path = folder / "cpu.max"
        text = read_text(path)
        if text is None:
            continue
        where = shown(path, base)
        try:
            cpus = parse_cpu_max(text)
        except ValueError as err:
            limits.append(
                Limit(
                    kind="cgroup_v2",
                    cpus=None,
                    raw=text.strip(),
                    where=where,
                    detail=f"ignored: {err}",
                )
            )
            continue
        detail = "no quota (max)" if cpus is None else f"quota of {cpus:g} CPUs"
        limits.append(
            Limit(kind="cgroup_v2", cpus=cpus, raw=text.strip(), where=where, detail=detail)
        )
    return limits


def _v1_limits(folders: list[Path], base: Path) -> list[Limit]:
    limits = []
    for folder in folders:
        quota_path, period_path = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
        quota, period = read_text(quota_path), read_text(period_path)
        if quota is None:
            continue
        where = shown(quota_path, base)
        raw = f"{quota.strip()} / {(period or '').strip()}"
        try:
            cpus = parse_cfs_quota(quota, period if period is not None else "100000")
        except ValueError as err:
            limits.append(
                Limit(kind="cgroup_v1", cpus=None, raw=raw, where=where, detail=f"ignored: {err}")
            )
            continue
        detail = "no quota (-1)" if cpus is None else f"quota of {cpus:g} CPUs"
        limits.append(Limit(kind="cgroup_v1", cpus=cpus, raw=raw, where=where, detail=detail))
    return limits


def process_cpu_seconds(pid: int, proc_root: Path = Path("/proc")) -> float | None:
    """CPU seconds ``pid`` has used so far (user plus system, from ``/proc/<pid>/stat``), or
    ``None`` where that cannot be read (no ``/proc``, an exited process, permissions)."""
    ticks = parse_stat_cpu_ticks(read_text(proc_root / str(pid) / "stat") or "")
    if ticks is None:
        return None
    try:
        per_second = os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return None
    return ticks / per_second if per_second > 0 else None
