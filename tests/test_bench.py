"""stoker.bench and ``stoker bench``: measurements with a fake clock, memory from a fake /proc."""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stoker.bench import (
    BenchReport,
    LoaderMeasurement,
    _settings,
    bench_loader,
    measure_epoch_gap,
    measure_loader,
    measure_worker_growth,
    plot_bench,
    require_plotting,
    touch_catalog,
    touch_records,
)
from stoker.cli import main
from stoker.errors import StokerError
from stoker.system.memory import MemoryUse, child_pids, read_memory
from stoker.system.procfs import parse_proc_fields

SMAPS = """\
55a4c0e2a000-7ffd1c3f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              120000 kB
Pss:               80000 kB
Pss_Anon:          60000 kB
Shared_Clean:      30000 kB
Shared_Dirty:       2000 kB
Private_Clean:      8000 kB
Private_Dirty:     80000 kB
Swap:                  0 kB
"""


def _ticks(step: float = 1.0):
    counter = itertools.count()
    return lambda: next(counter) * step


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    import stoker
    from stoker.data.synthetic import write_sample_dataset

    written = write_sample_dataset(tmp_path_factory.mktemp("bench") / "s", images=8)
    return written, stoker.load_dataset(written.config, progress=lambda d, t: None)


@pytest.fixture
def no_proc(tmp_path) -> Path:
    """An empty /proc: memory readings are None, so results depend on the clock alone."""
    root = tmp_path / "proc"
    root.mkdir()
    return root


# --- memory --------------------------------------------------------------------------------------


def test_parse_smaps_rollup_reads_kb_fields_as_bytes():
    fields = parse_proc_fields(SMAPS)
    assert fields["Rss"] == 120000 * 1024 and fields["Pss"] == 80000 * 1024
    assert "55a4c0e2a000-7ffd1c3f2000 ---p 00000000 00" not in fields


def test_read_memory_from_a_fake_proc(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "smaps_rollup").write_text(SMAPS)
    use = read_memory(4242, proc_root=tmp_path)
    assert use == MemoryUse(
        pid=4242, rss_bytes=120000 * 1024, pss_bytes=80000 * 1024, uss_bytes=88000 * 1024
    )
    assert read_memory(1, proc_root=tmp_path) is None  # no such process: no reading, no error
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "smaps_rollup").write_text("garbage\n")
    assert read_memory(7, proc_root=tmp_path) is None


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs smaps_rollup")
def test_read_memory_of_this_process():
    use = read_memory()
    assert use is not None and use.pid == os.getpid()
    assert 0 < use.uss_bytes <= use.rss_bytes and 0 < use.pss_bytes <= use.rss_bytes


def test_child_pids_follow_the_parent_field_and_skip_helpers(tmp_path):
    def proc(pid: int, ppid: int, cmdline: bytes, comm: str = "python") -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1\n")
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)

    proc(10, 1, b"python\0train.py")
    proc(11, 10, b"python\0train.py")  # a forked worker
    proc(12, 10, b"python\0-c\0from multiprocessing.spawn import spawn_main")
    proc(13, 10, b"python\0-c\0from multiprocessing.resource_tracker import main")
    proc(14, 99, b"python")
    proc(15, 10, b"python", comm="odd ) name 3")  # ')' in the command name
    (tmp_path / "self").mkdir()
    assert child_pids(tmp_path, parent=10) == {11, 12, 15}


# --- one loader ----------------------------------------------------------------------------------


def test_measure_loader_in_process_with_a_fake_clock(sample, no_proc):
    _, dataset = sample
    m = measure_loader(dataset, workers=0, batches=5, clock=_ticks(), proc_root=no_proc)
    assert isinstance(m, LoaderMeasurement)
    assert m.workers == 0 and m.start_method is None and m.persistent is False
    assert m.batches == 5 and m.warmup_batches == 1
    # The clock ticks once at the start and once per batch: batches at 1, 2, 3, 4, 5.
    assert m.first_batch_seconds == 1 and m.seconds == 5 and m.median_batch_seconds == 1
    assert m.images > 0
    assert m.main_memory is None and m.worker_memory == () and m.total_pss_bytes is None


def test_measure_loader_counts_images_and_crosses_epochs(sample, no_proc):
    _, dataset = sample
    per_epoch = len(dataset.make_batch_sampler(seed=0))
    m = measure_loader(
        dataset, workers=0, batches=per_epoch + 3, clock=_ticks(0.5), proc_root=no_proc
    )
    assert m.batches == per_epoch + 3 and m.images >= m.batches
    assert m.images_per_second > 0


def test_measure_loader_steady_rate_leaves_out_the_warmup(no_proc):
    dataset = torch.utils.data.TensorDataset(torch.zeros(12, 3))
    m = measure_loader(dataset, workers=0, batches=12, clock=_ticks(), proc_root=no_proc)
    # 12 batches of one image, a tick apart; the first is warm-up: 11 images in 11 ticks.
    assert m.images == 12 and m.images_per_second == pytest.approx(1.0)


def test_measure_loader_calls_the_step_inside_the_timed_loop(no_proc):
    seen = []
    dataset = torch.utils.data.TensorDataset(torch.zeros(3, 2))
    measure_loader(dataset, workers=0, batches=3, step=seen.append, proc_root=no_proc)
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"workers": -1}, "workers=-1"), ({"workers": 0, "batches": 0}, "batches=0")],
)
def test_measure_loader_rejects_meaningless_settings(sample, kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_loader(sample[1], **kwargs)


def test_measure_epoch_gap_in_process(sample, no_proc):
    _, dataset = sample
    gap = measure_epoch_gap(dataset, workers=0, persistent=False, epochs=2, clock=_ticks())
    assert gap.epochs == 2 and gap.gap_seconds == (1,) and gap.median_gap_seconds == 1
    assert gap.first_batch_seconds == 1 and gap.median_batch_seconds == 1
    with pytest.raises(ValueError, match="epochs=1"):
        measure_epoch_gap(dataset, workers=0, persistent=False, epochs=1)


# --- several settings ----------------------------------------------------------------------------


def test_settings_measure_zero_workers_once():
    assert _settings([0, 1, 2], ("fork", "spawn")) == [
        (0, None),
        (1, "fork"),
        (2, "fork"),
        (1, "spawn"),
        (2, "spawn"),
    ]


def test_bench_loader_keeps_the_median_run_and_reports_progress(sample, no_proc):
    _, dataset = sample
    # Three runs of one start and four batches each: medium, fast, slow.
    steps = iter([1.0] * 5 + [0.25] * 5 + [4.0] * 5)
    now = [0.0]

    def clock() -> float:
        now[0] += next(steps)
        return now[0]

    seen = []
    report = bench_loader(
        dataset,
        workers=[0],
        batches=4,
        repeats=3,
        budget_cpus=2,
        source="tiny",
        clock=clock,
        progress=lambda done, total: seen.append((done, total)),
        proc_root=no_proc,
    )
    assert isinstance(report, BenchReport) and report.repeats == 3 and report.budget_cpus == 2
    (only,) = report.measurements
    assert only.median_batch_seconds == 1.0  # the middle run of the three
    assert seen[-1] == (12, 12) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert report.best() is only


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"workers": []}, "at least one"), ({"workers": [0], "repeats": 0}, "repeats=0")],
)
def test_bench_loader_rejects_meaningless_settings(sample, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_loader(sample[1], batches=1, budget_cpus=1, **kwargs)


# --- catalogs ------------------------------------------------------------------------------------


def _small_catalog(n: int = 50):
    from stoker.data.catalog import Catalog, StringTable

    return Catalog(
        paths=StringTable.from_strings(f"/d/img_{i}.jpg" for i in range(n)),
        captions=StringTable.from_strings(f"caption {i}" for i in range(n)),
        conditioning=StringTable.from_strings("" for _ in range(n)),
        widths=np.full(n, 640, np.int32),
        heights=np.full(n, 480, np.int32),
        subset=np.zeros(n, np.int32),
        subsets=(),
        dataset_of_subset=(),
    )


def test_touch_functions_read_every_entry():
    assert touch_catalog(_small_catalog(50)) == 50
    records = [{"path": "a", "caption": "b", "width": 1, "height": 2, "subset": 0}] * 7
    assert touch_records(records) == 7


@pytest.mark.slow
def test_measure_worker_growth_with_a_forked_worker():
    growth = measure_worker_growth(_small_catalog(1000), touch_catalog, workers=1)
    assert growth.workers == 1 and growth.entries == 1000
    assert len(growth.uss_growth_bytes) == 1
    if Path("/proc/self/smaps_rollup").exists():
        assert growth.worker_pss_bytes and growth.worker_pss_bytes > 0


@pytest.mark.slow
def test_measure_loader_with_a_worker_reads_its_memory(sample):
    m = measure_loader(sample[1], workers=1, batches=4, start_method="fork")
    assert m.workers == 1 and m.start_method == "fork" and m.persistent
    if Path("/proc/self/smaps_rollup").exists():
        assert len(m.worker_memory) == 1 and m.worker_pss_bytes > 0
        assert m.total_pss_bytes > m.worker_pss_bytes


# --- plot ----------------------------------------------------------------------------------------


def _report() -> BenchReport:
    def row(workers: int, method: str | None, rate: float) -> LoaderMeasurement:
        return LoaderMeasurement(
            workers=workers,
            start_method=method,
            persistent=workers > 0,
            batches=10,
            warmup_batches=1,
            images=40,
            seconds=2.0,
            first_batch_seconds=0.1,
            images_per_second=rate,
            median_batch_seconds=0.1,
            main_memory=None,
            worker_memory=(),
            worker_pss_bytes=workers * 2**27 or None,
            worker_uss_bytes=None,
            total_pss_bytes=2**28 + workers * 2**27,
        )

    rows = (row(0, None, 20.0), row(1, "fork", 19.0), row(2, "fork", 36.0), row(2, "spawn", 35.0))
    return BenchReport(source="fake", budget_cpus=2, repeats=1, measurements=rows)


def test_plot_bench_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_bench(_report(), tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(StokerError, match=r"pip install 'stoker\[bench\]'"):
        require_plotting()
    with pytest.raises(StokerError, match="matplotlib"):
        plot_bench(_report(), tmp_path / "plot.png")


# --- the command ---------------------------------------------------------------------------------


def test_cli_bench_json(sample, capsys):
    written, _ = sample
    assert main(["bench", str(written.config), "--workers", "0", "--batches", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == str(written.config)
    (only,) = report["measurements"]
    assert only["workers"] == 0 and only["batches"] == 3 and only["images_per_second"] > 0


def test_cli_bench_table_and_plot(sample, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    written, _ = sample
    plot = tmp_path / "bench.png"
    args = ["bench", str(written.config), "--workers", "0", "--batches", "2", "--plot", str(plot)]
    assert main([*args, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "workers  start   images/s  lowest-highest  first batch s" in out
    assert "Fastest: 0 workers" in out and f"Plot: {plot}" in out
    # 2 batches is far too few: the figure is marked, and the flag to fix it is named.
    assert "? Not reliable:" in out and "measure at least 21 batches" in out
    assert "--batches" in out and "(not reliable, see above)" in out
    assert out.index("Fastest:") < out.index("Plot:")
    assert plot.stat().st_size > 0


def test_cli_bench_checks_the_plot_folder_before_measuring(sample, capsys, tmp_path, monkeypatch):
    import stoker.bench

    def never(*args, **kwargs):
        raise AssertionError("measured although the plot could not be written")

    monkeypatch.setattr(stoker.bench, "bench_loader", never)
    written, _ = sample
    missing = tmp_path / "nonexistent_dir" / "x.png"
    assert main(["bench", str(written.config), "--plot", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: --plot ") and "does not exist" in err
    assert main(["bench", str(written.config), "--plot", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_cli_bench_prints_the_table_even_when_the_plot_cannot_be_saved(
    sample, capsys, tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib")
    import stoker.bench

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stoker.bench, "plot_bench", full_disk)
    written, _ = sample
    args = ["bench", str(written.config), "--workers", "0", "--batches", "3", "--repeats", "1"]
    assert main([*args, "--plot", str(tmp_path / "b.png")]) == 1
    captured = capsys.readouterr()
    assert "Fastest: 0 workers" in captured.out
    assert "could not write the plot: No space left on device" in captured.err


def test_default_run_length_bounds_the_prefetch_error():
    from stoker.bench import steady_batches_needed, warmup_batches

    assert warmup_batches(0) == 1 and warmup_batches(4) == 8 and warmup_batches(4, 4) == 16
    assert steady_batches_needed(0) == 21  # at least 20 timed batches
    assert steady_batches_needed(4) == 8 + 64  # queued batches are at most 1/8 of those timed


def _measured(workers: int, rate: float, runs: tuple[float, ...] = ()) -> LoaderMeasurement:
    return LoaderMeasurement(
        workers=workers,
        start_method=None,
        persistent=workers > 0,
        batches=100,
        warmup_batches=2 * workers or 1,
        images=400,
        seconds=10.0,
        first_batch_seconds=0.5,
        images_per_second=rate,
        median_batch_seconds=0.1,
        main_memory=None,
        worker_memory=(),
        worker_pss_bytes=None,
        worker_uss_bytes=None,
        total_pss_bytes=None,
        run_images_per_second=runs,
    )


def test_a_rate_the_cpus_cannot_make_is_flagged():
    from stoker.bench import implausible_rates

    # The case: 2 CPUs that make ~15 images/s in-process cannot make 242 with 4 workers.
    rows = [_measured(0, 15.0), _measured(2, 30.0), _measured(4, 242.7)]
    found = implausible_rates(rows, budget_cpus=2)
    assert list(found) == [2]
    assert "242.7 images/s is more than 2 CPUs can make" in found[2]
    assert implausible_rates(rows[1:], budget_cpus=2) == {}  # nothing to compare with


def test_bench_keeps_the_median_and_flags_runs_that_disagree(sample, no_proc, monkeypatch):
    import stoker.bench

    rates = iter([30.0, 10.0, 20.0, 20.0, 21.0, 19.0])

    def fake_measure(dataset, **kwargs):
        return _measured(kwargs["workers"], next(rates))

    monkeypatch.setattr(stoker.bench, "measure_loader", fake_measure)
    _, dataset = sample
    report = bench_loader(dataset, workers=[0, 1], batches=5, repeats=3, budget_cpus=2)
    shaky, steady = report.measurements
    assert shaky.images_per_second == 20.0 and shaky.run_images_per_second == (10.0, 20.0, 30.0)
    assert any("runs differ by more than 25%" in c for c in shaky.caveats)
    assert steady.images_per_second == 20.0 and steady.caveats == ()
    assert not report.reliable


@pytest.mark.slow
def test_more_workers_than_cpus_warn_once_in_the_report_not_by_pytorch(sample, no_proc):
    _, dataset = sample
    many = (os.cpu_count() or 1) + 1
    # filterwarnings=error: PyTorch's "will create N worker processes" would fail this test.
    report = bench_loader(dataset, workers=[many], batches=2, budget_cpus=1, proc_root=no_proc)
    (note,) = report.notes
    assert note.startswith(f"{many} workers: more than the CPU budget (1 CPU)")


def test_plot_starts_at_zero_and_marks_the_choice_and_budget():
    pytest.importorskip("matplotlib")
    from stoker.bench import _bench_figure

    report = _report()
    fig = _bench_figure(report, planned_workers=1)
    rate_ax, mem_ax = fig.axes
    assert rate_ax.get_ylim()[0] == 0 and mem_ax.get_ylim()[0] == 0
    labels = [t.get_text() for t in rate_ax.get_legend().get_texts()]
    assert "stoker's choice (1 worker)" in labels and "CPU budget (2 CPUs)" in labels
    assert not any(label in ("default", "None") for label in labels)
    assert "stoker bench: loading fake" in fig._suptitle.get_text()


def test_cli_bench_bad_workers_is_a_usage_error(sample, capsys):
    assert main(["bench", str(sample[0].config), "--workers", "two"]) == 2
    assert "--workers 'two' is not valid" in capsys.readouterr().err


def test_cli_bench_plot_without_matplotlib_fails_before_measuring(sample, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["bench", str(sample[0].config), "--plot", "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stoker: error: plotting needs matplotlib") and "stoker[bench]" in err


@pytest.mark.slow
def test_cli_bench_with_workers(sample, capsys):
    written, _ = sample
    args = ["bench", str(written.config), "--workers", "0,1", "--batches", "4", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["workers"] for m in report["measurements"]] == [0, 1]


# --- the benchmark suite -------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_suite_quick_smoke_run(tmp_path):
    """``benchmarks/run.py --quick`` end to end on a 4-image dataset (about 35 s on 2 CPUs)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    out = tmp_path / "results.json"
    args = ["--quick", "--images", "4", "--data", str(tmp_path / "data"), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"loader", "epoch_gap", "memory", "scan", "targets"} <= set(results)
    assert results["memory"]["catalog"]["entries"] == 100_000
    assert "Targets:" in done.stdout
    if "per_core" in results:  # needs OpenCV (the bench extra) for the reference
        for key in ("separate_processes", "separate_processes_jpeg_only"):
            separate = results["per_core"][key]
            assert set(separate["warm_images_per_cpu_second"]) == {"reference", "loader", "sample"}
            assert separate["ratio"] > 0
        assert "JPEG-only set (>= 2.5)" in done.stdout
        assert "its JPEGs only (the issue's set)" in done.stdout
