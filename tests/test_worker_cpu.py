"""Reading the CPU time of worker processes (live tuning rules out fewer workers with it)."""

from __future__ import annotations

import os

import pytest

from stoker.autotune import Decision, Window
from stoker.autotune.driver import measurements_of
from stoker.autotune.edges import WorkerCpu
from stoker.system.cpu import process_cpu_seconds
from stoker.system.procfs import parse_stat_cpu_ticks

# /proc/<pid>/stat of a process whose name holds spaces and a parenthesis: utime 250, stime 50
STAT = "4242 (pt worker) 1) S 4000 4242 4000 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 1 0 77 0 0"


def test_the_cpu_ticks_are_utime_plus_stime_after_the_name():
    assert parse_stat_cpu_ticks(STAT) == 300
    assert parse_stat_cpu_ticks("") is None
    assert parse_stat_cpu_ticks("4242 (short) S 1 2") is None


def test_a_process_cpu_seconds_from_a_proc_tree(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(STAT)
    assert process_cpu_seconds(4242, tmp_path) == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert process_cpu_seconds(4243, tmp_path) is None  # exited, or never there


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc on this system")
def test_this_process_cpu_time_grows_while_it_computes():
    before = process_cpu_seconds(os.getpid())
    assert before is not None
    after = before
    for _ in range(10_000):  # a tick is 10 ms of CPU; this loop needs far less than 10 s
        sum(range(10_000))
        after = process_cpu_seconds(os.getpid())
        if after is not None and after > before:
            break
    assert after is not None and after > before


class FakeLoader:
    def __init__(self, pids):
        self.pids = pids

    def worker_pids(self):
        return list(self.pids)


def test_worker_cpu_is_a_running_total_across_worker_sets():
    used = {10: 1.0, 11: 2.0}
    reader = WorkerCpu(read=lambda pid: used.get(pid))
    loader = FakeLoader([10, 11])
    assert reader(loader) == pytest.approx(3.0)  # first seen: all they used since they started
    used.update({10: 1.5, 11: 2.25})
    assert reader(loader) == pytest.approx(3.75)
    # worker 11 exits (its last part is lost: the total falls short, never over), 12 starts
    used.update({10: 2.0, 12: 0.5})
    del used[11]
    loader.pids = [10, 11, 12]
    assert reader(loader) == pytest.approx(4.75)
    assert WorkerCpu(read=lambda pid: None)(loader) is None
    assert WorkerCpu()(FakeLoader([])) is None


def test_the_measurements_shown_by_plans_and_stoker_tune_carry_the_cpus():
    read = Window(
        workers=2, batches=24, samples=24, wait_seconds=0.5, cpu_seconds=0.95, cpu_wall=0.5
    )
    unread = Window(workers=1, batches=12, samples=12, wait_seconds=0.5)
    decision = Decision(workers=2, switch=False, settled=True, reason="r", measured=(unread, read))
    notes = [m.note for m in measurements_of(decision, 2)]
    assert notes == [
        "live: the training loop waited 100%",
        "live: the training loop waited 100%, the workers used 1.9 CPUs",
    ]
