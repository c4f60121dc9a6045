"""One parser per /proc and cgroup file format stoker reads: fields, cgroup membership, mountinfo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Mount",
    "cgroup_ancestors",
    "cgroup_membership",
    "cgroup_mounts",
    "parse_proc_fields",
    "parse_stat_cpu_ticks",
    "read_text",
    "shown",
]


def read_text(path: Path) -> str | None:
    """The file's text, or ``None`` when it cannot be read (absent, permissions, not text)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def parse_proc_fields(text: str) -> dict[str, int]:
    """``/proc/meminfo`` or ``/proc/<pid>/smaps_rollup`` as ``{name: bytes}`` (``Name: N kB``
    lines; a number without a unit is kept as it is; other lines, such as smaps_rollup's address
    header, are skipped)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        # Field names are one token; the header "55a...-7ff... ---p 00000000 00:00 0" is not.
        if sep and parts and parts[0].isdigit() and name and not any(c.isspace() for c in name):
            unit = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            fields[name.strip()] = int(parts[0]) * unit
    return fields


def parse_stat_cpu_ticks(text: str) -> int | None:
    """From ``/proc/<pid>/stat``: the CPU time the process used, user plus system, in clock ticks
    (fields 14 and 15; the command name in field 2 may hold spaces and parentheses, so fields
    are counted after its last ``)``). ``None`` when the text is not such a line."""
    fields = text.rpartition(")")[2].split()
    # after the name: state (field 3) is fields[0], so utime (14) is fields[11], stime fields[12]
    if len(fields) < 13 or not fields[11].isdigit() or not fields[12].isdigit():
        return None
    return int(fields[11]) + int(fields[12])


def cgroup_membership(base: Path) -> tuple[str | None, dict[str, str]]:
    """From ``/proc/self/cgroup``: the v2 path and the v1 path per controller."""
    text = read_text(base / "proc/self/cgroup") or ""
    v2_path: str | None = None
    v1_paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        for controller in controllers.split(","):
            if controller:
                v1_paths[controller] = path
    return v2_path, v1_paths


@dataclass(frozen=True, slots=True)
class Mount:
    """One cgroup mount from ``/proc/self/mountinfo``: what part of the hierarchy, and where."""

    root: str
    point: str


def cgroup_mounts(base: Path) -> tuple[Mount | None, dict[str, Mount]]:
    """From ``/proc/self/mountinfo``: the cgroup2 mount, and the v1 mount of each controller."""
    text = read_text(base / "proc/self/mountinfo") or ""
    v2: Mount | None = None
    v1: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mount = Mount(root=fields[3], point=fields[4])
        if tail[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif tail[0] == "cgroup" and len(tail) >= 3:
            for controller in tail[2].split(","):
                v1.setdefault(controller, mount)
    if v2 is None and (base / "sys/fs/cgroup/cgroup.controllers").exists():
        # A cgroup2 root mounted where mountinfo does not say (some container runtimes).
        v2 = Mount(root="/", point="/sys/fs/cgroup")
    return v2, v1


def cgroup_ancestors(group_path: str, mount: Mount, base: Path) -> list[Path]:
    """The cgroup folders from the process's own group up to the mount root, deepest first."""
    rel = group_path
    if mount.root not in ("/", "") and rel.startswith(mount.root):
        rel = rel[len(mount.root) :]
    parts = [p for p in rel.split("/") if p and p != ".."]
    top = base / mount.point.lstrip("/")
    return [top.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def shown(path: Path, base: Path) -> str:
    """``path`` as the real machine names it: relative to the (possibly fake) root ``base``."""
    try:
        return "/" + str(path.relative_to(base))
    except ValueError:
        return str(path)
