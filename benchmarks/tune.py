"""workers="auto" against a full sweep, the probe's cost, the cached choice, consumers, the monitor.

One command: ``python benchmarks/tune.py`` (``--quick`` for a smaller, noisier run). It writes a
deterministic synthetic dataset under ``benchmarks/out/tune-data`` (once), then, in one run:

1. **sweep**: the steady throughput of every worker count 0 .. budget+2 (each measured ``--repeats``
   times, interleaved, median kept); auto's throughput is the sweep's figure for the count
   ``workers="auto"`` chose, measured in the same interleaved runs; target: >= 0.95 x the best;
2. **probe cost**: ``make_loader(dataset, workers="auto")`` with an empty cache, against its limit,
   min(10 s, 5% of an epoch at the best rate); **cached**: the same call again (target < 50 ms);
3. **consumers**: for training steps that take a few rates (batches/s), the count chosen with
   ``consumer_rate=``, the fewest counts of the sweep that keep up with and without the margin,
   and a simulated training loop (sleeping 1/rate per batch) at the chosen count and one fewer,
   with the wait fraction the monitor saw;
4. **monitor overhead**: the cost per batch of timing it (a micro-benchmark of what the loader
   adds per batch, and a loader over a trivial dataset with the monitor on and off).

Results go to ``benchmarks/out/tune.json``; figures for docs/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import stoker
from stoker.data.synthetic import write_sample_dataset
from stoker.monitor import InputMonitor, batch_samples
from stoker.tune import CONSUMER_MARGIN, ZERO_WORKERS_FACTOR

OUT = Path(__file__).resolve().parent / "out"


def dataset_at(images: int) -> Any:
    root = OUT / f"tune-data-{images}"
    if not (root / "dataset.toml").exists():
        write_sample_dataset(root, images=images, seed=0)
    return stoker.load_dataset(root / "dataset.toml", on_error="raise")


def steady_rate(loader: Any, seconds: float) -> float:
    """Batches/s after the first batch and the backlog queued while workers started, over whole
    rounds of one batch per worker (the same way the probe measures; see stoker.tune)."""
    round_size = max(loader.num_workers, 1)
    it = iter(loader)
    with warnings.catch_warnings():  # torch's advice about more workers than CPUs: intended here
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        for _ in range(max(loader.num_workers * (loader.prefetch_factor or 1), 1)):
            next(it)
    first = time.perf_counter()
    count = 0
    for _ in it:
        count += 1
        now = time.perf_counter()
        if count % round_size == 0 and count >= 2 * round_size and now - first >= seconds:
            break
    del it
    return count / (time.perf_counter() - first)


def loader_for(dataset: Any, workers: int, budget: stoker.Budget) -> Any:
    # Plan on a budget of at least `workers` CPUs so the planner does not clamp the count.
    cpus = max(workers, budget.cpus)
    with warnings.catch_warnings():  # torch's advice about more workers than CPUs: intended here
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        return stoker.make_loader(
            dataset, workers=workers, budget=cpus, seed=0, persistent=False, monitor=False
        )


def sweep(dataset: Any, budget: stoker.Budget, counts: list[int], seconds: float, repeats: int):
    rates: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(repeats):
        for k in counts:
            rates[k].append(steady_rate(loader_for(dataset, k, budget), seconds))
    return {k: statistics.median(v) for k, v in rates.items()}


def probe_costs(dataset: Any, cache: Path) -> dict[str, Any]:
    for old in (cache / "tune").glob("*.json") if (cache / "tune").exists() else []:
        old.unlink()
    start = time.perf_counter()
    loader = stoker.make_loader(dataset, workers="auto", seed=0)
    probe = time.perf_counter() - start
    hits = []
    for _ in range(5):
        start = time.perf_counter()
        again = stoker.make_loader(dataset, workers="auto", seed=0)
        hits.append(time.perf_counter() - start)
    note = next(a for a in again.plan.defaults if a.setting == "workers")
    assert "remembered" in note.reason, note.reason
    lookup = []
    for _ in range(5):
        start = time.perf_counter()
        result = stoker.tune_loader(dataset)
        lookup.append(time.perf_counter() - start)
        assert result.cached
    return {
        "workers": loader.num_workers,
        "reason": next(a for a in loader.plan.defaults if a.setting == "workers").reason,
        "probe_seconds": probe,
        "cached_make_loader_seconds": statistics.median(hits),
        "cached_tune_loader_seconds": statistics.median(lookup),
    }


def simulated_wait(dataset: Any, workers: int, rate: float, seconds: float, budget) -> float:
    """Wait fraction of a training loop that takes 1/rate s per step, after warm-up."""
    monitor = InputMonitor(window_batches=10**6)  # never warns here; we only read the figures
    loader = stoker.make_loader(
        dataset, workers=workers, budget=max(workers, budget.cpus), seed=0, monitor=monitor
    )
    it = iter(loader)
    for _ in range(max(workers, 1) * 2 + 2):  # warm-up: workers start, queues fill
        next(it)
        time.sleep(1.0 / rate)
    before = monitor.stats(workers=workers)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        next(it)
        time.sleep(1.0 / rate)
    after = monitor.stats(workers=workers)
    del it
    wait = after.wait_seconds - before.wait_seconds
    return wait / max(after.wall_seconds - before.wall_seconds, 1e-9)


def consumers(dataset, budget, rates_by_count, fractions, seconds) -> list[dict[str, Any]]:
    best = max(rates_by_count.values())
    rows = []
    for fraction in fractions:
        rate = best * fraction
        result = stoker.tune_loader(dataset, consumer_rate=rate, cache=False, progress=False)
        k = result.plan.num_workers
        enough = [c for c, r in sorted(rates_by_count.items()) if c and r >= rate]
        with_margin = [
            c
            for c, r in sorted(rates_by_count.items())
            if r >= rate * (ZERO_WORKERS_FACTOR if c == 0 else CONSUMER_MARGIN)
        ]
        row = {
            "consumer_rate": rate,
            "chosen": k,
            "fewest_that_keep_up_in_sweep": enough[0] if enough else None,
            "fewest_with_margin_in_sweep": with_margin[0] if with_margin else None,
            "wait_fraction_chosen": simulated_wait(dataset, k, rate, seconds, budget),
            "wait_fraction_one_fewer": (
                simulated_wait(dataset, k - 1, rate, seconds, budget) if k > 0 else None
            ),
            "probe_measured": [m.workers for m in result.measurements if m.batches],
        }
        rows.append(row)
    return rows


def monitor_overhead(batches: int) -> dict[str, float]:
    monitor = InputMonitor()
    clock = monitor.clock
    batch = {"images": torch.zeros(2, 3, 8, 8), "captions": ["a", "b"]}
    start = time.perf_counter()
    for _ in range(batches):
        asked = clock()
        monitor.record(asked, clock(), batch_samples(batch))
    micro = (time.perf_counter() - start) / batches

    def loop(monitor_on: bool) -> float:
        loader = stoker.make_loader(
            list(range(batches)),
            batch_size=None,
            workers=0,
            budget=1,
            monitor=InputMonitor(window_batches=10**6) if monitor_on else False,
        )
        start = time.perf_counter()
        for _ in loader:
            pass
        return (time.perf_counter() - start) / batches

    on, off = [], []
    for _ in range(5):
        off.append(loop(False))
        on.append(loop(True))
    return {
        "record_seconds_per_batch": micro,
        "loader_seconds_per_batch_monitor_off": statistics.median(off),
        "loader_seconds_per_batch_monitor_on": statistics.median(on),
        "added_seconds_per_batch": statistics.median(on) - statistics.median(off),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller dataset, shorter timings")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="per sweep measurement")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    images = args.images or (160 if args.quick else 640)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    repeats = args.repeats or (1 if args.quick else 3)
    cache = OUT / "tune-cache"
    os.environ["STOKER_CACHE_DIR"] = str(cache)
    budget = stoker.cpu_budget()
    dataset = dataset_at(images)
    per_epoch = dataset.report.batches_per_epoch
    print(f"dataset: {images} images, {per_epoch} batches/epoch; CPU budget {budget.cpus}")

    costs = probe_costs(dataset, cache)
    counts = list(range(budget.cpus + 3))
    rates = sweep(dataset, budget, counts, seconds, repeats)
    auto_rate = rates[costs["workers"]]
    best_k = max(rates, key=rates.__getitem__)
    limit = min(10.0, 0.05 * per_epoch / rates[best_k])
    print("\nsweep (batches/s, median of", repeats, "):")
    for k, r in rates.items():
        print(f"  workers={k}: {r:6.1f}  ({r / rates[best_k]:.2f}x best)")
    print(f"auto chose {costs['workers']} workers: {auto_rate:.1f} batches/s in the sweep")
    print(f"  auto / best of sweep = {auto_rate / rates[best_k]:.2f}  (target >= 0.95)")
    print(f"  why: {costs['reason']}")
    print(
        f"probe: {costs['probe_seconds']:.2f} s; limit min(10 s, 5% of a "
        f"{per_epoch / rates[best_k]:.0f} s epoch) = {limit:.2f} s "
        f"({costs['probe_seconds'] / limit:.2f}x the limit)"
    )
    print(
        f"cached choice: make_loader {costs['cached_make_loader_seconds'] * 1000:.1f} ms, "
        f"tune_loader {costs['cached_tune_loader_seconds'] * 1000:.1f} ms (target < 50 ms)"
    )

    fractions = (0.15, 0.4, 0.7) if not args.quick else (0.15, 0.7)
    rows = consumers(dataset, budget, rates, fractions, seconds)
    print(f"\nsimulated training steps (margin {CONSUMER_MARGIN}x):")
    for row in rows:
        fewer = row["wait_fraction_one_fewer"]
        print(
            f"  step at {row['consumer_rate']:5.1f} batches/s: chose {row['chosen']} workers "
            f"(sweep: {row['fewest_that_keep_up_in_sweep']} workers keep up, "
            f"{row['fewest_with_margin_in_sweep']} with the margin); waits "
            f"{row['wait_fraction_chosen']:.0%} of the time"
            + (f", with one fewer {fewer:.0%}" if fewer is not None else "")
        )

    overhead = monitor_overhead(20_000 if args.quick else 100_000)
    print(
        f"\nmonitor: {overhead['record_seconds_per_batch'] * 1e6:.2f} us per batch recorded; "
        f"loader over a trivial dataset {overhead['loader_seconds_per_batch_monitor_off'] * 1e6:.2f}"
        f" -> {overhead['loader_seconds_per_batch_monitor_on'] * 1e6:.2f} us per batch "
        f"(+{overhead['added_seconds_per_batch'] * 1e6:.2f} us)"
    )
    report = {
        "machine": {"cpus": budget.cpus, "source": budget.source, "python": sys.version.split()[0]},
        "dataset": {"images": images, "batches_per_epoch": per_epoch},
        "sweep_batches_per_second": rates,
        "auto": {
            **costs,
            "batches_per_second": auto_rate,
            "ratio_to_best": auto_rate / rates[best_k],
        },
        "probe_limit_seconds": limit,
        "consumers": rows,
        "monitor": overhead,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tune.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT / 'tune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
