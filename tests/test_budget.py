from __future__ import annotations

import pytest

from stoker import Budget, ConfigError, cpu_budget
from stoker.system.cpu import parse_cfs_quota, parse_cpu_max


def budget_of(fake_sys, *, cpus=64, environ=None, affinity=None):
    return cpu_budget(
        root=fake_sys.root,
        environ=environ or {},
        affinity=affinity if affinity is not None else set(range(cpus)),
        cpu_count=lambda: cpus,
    )


def test_no_limits_gives_os_count(fake_sys):
    budget = budget_of(fake_sys, cpus=16)
    assert budget.cpus == 16 and budget.node_cpus == 16
    assert budget.source == "os.cpu_count() 16 CPUs"
    assert [lim.kind for lim in budget.limits] == ["os", "affinity"]


def test_affinity_one_of_64(fake_sys):
    budget = budget_of(fake_sys, cpus=64, affinity={5})
    assert budget.cpus == 1
    assert budget.source == "CPU affinity 1 CPU"
    assert budget.binding is not None and budget.binding.raw == "5"


def test_cgroup_v2_quota_on_deeper_ancestor_wins(fake_sys):
    fake_sys.cgroup_v2(
        "/kubepods/pod1/ctr",
        {
            "": "max 100000",
            "kubepods": "max 100000",
            "kubepods/pod1": "150000 100000",
            "kubepods/pod1/ctr": "max 100000",
        },
    )
    budget = budget_of(fake_sys, cpus=64)
    assert budget.cpus == 1  # 1.5 rounds down
    assert budget.source == "cgroup v2 cpu.max 1.5 CPUs"
    assert budget.binding.where == "/sys/fs/cgroup/kubepods/pod1/cpu.max"
    checked = [lim.where for lim in budget.limits if lim.kind == "cgroup_v2"]
    assert checked == [
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max",
        "/sys/fs/cgroup/kubepods/cpu.max",
        "/sys/fs/cgroup/cpu.max",
    ]


def test_cgroup_v2_lowest_of_nested_quotas_wins(fake_sys):
    fake_sys.cgroup_v2("/a/b", {"a": "400000 100000", "a/b": "250000 100000"})
    budget = budget_of(fake_sys, cpus=64)
    assert budget.cpus == 2 and "2.5 CPUs" in budget.source


def test_cgroup_v2_max_is_no_limit(fake_sys):
    fake_sys.cgroup_v2("/", {"": "max 100000"})
    budget = budget_of(fake_sys, cpus=8)
    assert budget.cpus == 8
    (v2,) = [lim for lim in budget.limits if lim.kind == "cgroup_v2"]
    assert v2.cpus is None and v2.detail == "no quota (max)"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected"),
        ("garbage here now", "expected"),
        ("100000 0", "positive"),
        ("abc 100000", "invalid literal"),
    ],
    ids=["empty-cpu-max", "garbage", "zero-period", "not-a-number"],
)
def test_cgroup_v2_malformed_is_reported_and_ignored(fake_sys, text, why):
    fake_sys.cgroup_v2("/", {"": text})
    budget = budget_of(fake_sys, cpus=4)
    assert budget.cpus == 4
    (v2,) = [lim for lim in budget.limits if lim.kind == "cgroup_v2"]
    assert v2.cpus is None and v2.detail.startswith("ignored:") and why in v2.detail


def test_cgroup_v1_quota_minus_one_is_no_limit(fake_sys):
    fake_sys.cgroup_v1("/docker/abc", "-1")
    budget = budget_of(fake_sys, cpus=12)
    assert budget.cpus == 12
    (v1,) = [lim for lim in budget.limits if lim.kind == "cgroup_v1"][:1]
    assert v1.cpus is None and v1.detail == "no quota (-1)"


def test_cgroup_v1_half_cpu_never_below_one(fake_sys):
    fake_sys.cgroup_v1("/docker/abc", "50000", "100000")
    budget = budget_of(fake_sys, cpus=12)
    assert budget.cpus == 1
    assert budget.source == "cgroup v1 cpu.cfs_quota_us 0.5 CPUs"


def test_cpu_count_none_falls_back_to_other_limits(fake_sys):
    budget = cpu_budget(root=fake_sys.root, environ={}, affinity={0, 1, 2}, cpu_count=lambda: None)
    assert budget.cpus == 3
    assert budget.limits[0].cpus is None and "could not tell" in budget.limits[0].detail


def test_cpu_count_none_and_nothing_else_gives_one(fake_sys):
    budget = cpu_budget(root=fake_sys.root, environ={}, affinity=set(), cpu_count=lambda: None)
    assert budget.cpus == 1


def test_stoker_cpus_overrides_everything(fake_sys):
    fake_sys.cgroup_v2("/", {"": "100000 100000"})
    budget = budget_of(fake_sys, cpus=64, environ={"STOKER_CPUS": "6"})
    assert budget.cpus == 6
    assert budget.source == "STOKER_CPUS=6 (override)"
    assert budget.binding.kind == "override"


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_stoker_cpus_malformed_is_a_clear_error(fake_sys, value):
    with pytest.raises(ConfigError, match=r"STOKER_CPUS=.* is not a whole number of CPUs >= 1"):
        budget_of(fake_sys, environ={"STOKER_CPUS": value})


def test_slurm_and_python_cpu_count(fake_sys):
    budget = budget_of(
        fake_sys, cpus=64, environ={"SLURM_CPUS_PER_TASK": "12", "PYTHON_CPU_COUNT": "10"}
    )
    assert budget.cpus == 10 and budget.source == "PYTHON_CPU_COUNT 10 CPUs"
    budget = budget_of(fake_sys, cpus=64, environ={"SLURM_CPUS_PER_TASK": "x"})
    (slurm,) = [lim for lim in budget.limits if lim.kind == "slurm"]
    assert slurm.cpus is None and "ignored" in slurm.detail and budget.cpus == 64


def test_local_world_size_shares_the_node(fake_sys):
    budget = budget_of(fake_sys, cpus=64, environ={"LOCAL_WORLD_SIZE": "8"})
    assert budget.cpus == 8 and budget.node_cpus == 64 and budget.local_ranks == 8
    assert "shared by 8 local ranks: 8 each" in budget.source


def test_more_ranks_than_cpus_still_one_each(fake_sys):
    budget = budget_of(fake_sys, cpus=4, environ={"LOCAL_WORLD_SIZE": "8"})
    assert budget.cpus == 1 and budget.node_cpus == 4


def test_parsers():
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cfs_quota("-1", "100000") is None
    assert parse_cfs_quota("50000", "100000") == 0.5
    with pytest.raises(ValueError):
        parse_cpu_max("1 2 3")


def test_fixed_budget_validates():
    assert Budget.fixed(3).cpus == 3
    with pytest.raises(ValueError):
        Budget.fixed(0)


def test_real_machine_budget_is_sane():
    budget = cpu_budget()
    assert budget.cpus >= 1 and budget.limits
