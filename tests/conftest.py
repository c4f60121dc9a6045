"""Shared fixtures: a fake /proc + /sys tree, a deterministic hypothesis profile, warn-once reset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

import stoker

# The tests run against the installed stoker (make test installs this checkout with pip install -e),
# in-process and in the subprocesses they start (taskset, torchrun, spawned workers). Say so at once
# when another copy is installed, instead of testing it.
_SRC = Path(__file__).resolve().parents[1] / "src"
if not Path(stoker.__file__).resolve().is_relative_to(_SRC):
    raise pytest.UsageError(
        f"the installed stoker is {stoker.__file__}, not this checkout's {_SRC}: run `make test`, "
        "or `pip install -e .` here first"
    )

settings.register_profile("stoker", derandomize=True, deadline=None, max_examples=60)
settings.load_profile("stoker")


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    """Each test sees stoker's warn-once memory empty, so expected warnings do appear."""
    from stoker import warn

    warn.told.clear()
    yield
    warn.told.clear()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test remembers tuning choices in its own folder: live tuning reads and writes the
    cache for every loader left to choose its workers, and a choice from another test (or an
    earlier run) must not change where a test starts."""
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path_factory.mktemp("stoker-cache")))


@dataclass
class FakeSys:
    """A fake machine: writes the files cpu_budget() reads under ``root``."""

    root: Path

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def cgroup_v2(self, group: str, cpu_max: dict[str, str]) -> None:
        """Process in ``group``; ``cpu_max`` maps group paths ('' = root) to cpu.max text."""
        self.write("proc/self/cgroup", f"0::{group}\n")
        self.write(
            "proc/self/mountinfo",
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        )
        self.write("sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory\n")
        for path, text in cpu_max.items():
            self.write(f"sys/fs/cgroup/{path.strip('/')}/cpu.max".replace("//", "/"), text)

    def cgroup_v1(self, group: str, quota_us: str, period_us: str = "100000") -> None:
        self.write("proc/self/cgroup", f"12:memory:{group}\n4:cpu,cpuacct:{group}\n")
        self.write(
            "proc/self/mountinfo",
            "40 30 0:35 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        )
        folder = f"sys/fs/cgroup/cpu,cpuacct/{group.strip('/')}".rstrip("/")
        self.write(f"{folder}/cpu.cfs_quota_us", quota_us + "\n")
        self.write(f"{folder}/cpu.cfs_period_us", period_us + "\n")


@pytest.fixture
def fake_sys(tmp_path: Path) -> FakeSys:
    root = tmp_path / "machine"
    root.mkdir()
    return FakeSys(root)
