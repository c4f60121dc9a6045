"""workers="auto" tuned live, against every fixed worker count, side by side in one run.

One command: ``python benchmarks/tune.py`` (``--sets 40 --epochs 4`` for a shorter, noisier run).
It writes the benchmark images of ``benchmarks/run.py`` (photo-like JPEGs and PNGs of 0.3 to 12
megapixels, seed 0) once under ``benchmarks/out/``, with a config as in issue 13: resolution 1024,
batch size 1, one repeat. Then, for each set (40 and 400 images):

1. **no consumer**: a run of ``--epochs`` epochs (10) with a loop that only takes batches, with
   every fixed count 0 .. budget+1 and with ``workers="auto"`` (an empty cache, so nothing is
   remembered), interleaved. Figures: total time (from ``make_loader`` to the last batch, worker
   start-up, switches and all) against the best fixed count (target <= 1.05x), and batches/s in
   the settled epochs (after the last switch) against the best fixed count's over the same epochs
   (target >= 0.95x);
2. **tuning cost**: auto's total time over the time of the fixed count it settled on, minus one
   (target < 2%);
3. **consumers** (the first set only): a training step simulated by sleeping at three rates (half
   of what 1 worker delivers, between 1 worker and the best, twice the best). Every fixed count
   runs with it first, to find the fewest that keeps up (the loop waits at most 5%; else the
   best); then auto runs with it until it settles: which count and after how many batches
   (target: the fewest that keep up, within 2 epochs or 200 batches, whichever comes first).

The machine may be shared: every figure is one run, so say how busy the machine was when you
quote them. Results go to ``benchmarks/out/tune.json``; figures for docs/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import build_dataset  # noqa: E402  # benchmarks/run.py: the same images

import stoker  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
KEEP_UP_WAIT = 0.05

CONFIG = """[general]
enable_bucket = true
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = 1
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = "2_photo"
  num_repeats = 1
"""


def dataset_of(images: int) -> Any:
    root = OUT / f"tune-{images}"
    build_dataset(root, images=images)
    config = root / "tune.toml"
    config.write_text(CONFIG, encoding="utf-8")
    return stoker.load_dataset(config, on_error="raise", progress=lambda d, t: None)


def run(dataset: Any, workers: Any, epochs: int, *, rate: float | None = None, stop: Any = None):
    """One run: per-epoch seconds, total seconds, the loader (for its stats and tuning)."""
    budget = stoker.cpu_budget()
    planned = max(workers, budget.cpus) if isinstance(workers, int) else budget
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        os.environ["STOKER_CACHE_DIR"] = cache  # auto remembers nothing from an earlier run
        # torch's advice about more workers than CPUs: budget+1 is measured on purpose
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        warnings.filterwarnings("ignore", category=stoker.InputBoundWarning)
        began = time.perf_counter()
        loader = stoker.make_loader(dataset, workers=workers, budget=planned, seed=0)
        epoch_seconds, batches = [], 0
        for _ in range(epochs):
            start = time.perf_counter()
            for _batch in loader:
                batches += 1
                if rate:
                    time.sleep(1.0 / rate)
                if stop is not None and stop(loader, batches):
                    break
            epoch_seconds.append(time.perf_counter() - start)
            if stop is not None and stop(loader, batches):
                break
        total = time.perf_counter() - began
    return {"epoch_seconds": epoch_seconds, "total": total, "batches": batches, "loader": loader}


def no_consumer(dataset: Any, counts: list[int], epochs: int) -> dict[str, Any]:
    per_epoch = len(stoker.make_loader(dataset, workers=0, budget=1))
    runs: dict[Any, Any] = {}
    for workers in ["auto", *counts]:  # interleaved: one of each, auto first
        runs[workers] = run(dataset, workers, epochs)
        say(f"    {workers!s:>4}: {runs[workers]['total']:.1f} s")
    auto = runs.pop("auto")
    tuning = auto["loader"].stats()
    switches = tuning.switches
    settled_from = (switches[-1].epoch + 1) if switches else 0
    settled_from = min(settled_from, epochs - 1)
    best = min(counts, key=lambda k: runs[k]["total"])

    def rate(r: dict[str, Any]) -> float:
        return per_epoch * (epochs - settled_from) / sum(r["epoch_seconds"][settled_from:])

    best_settled = max(counts, key=lambda k: rate(runs[k]))
    chosen = auto["loader"].num_workers
    return {
        "batches_per_epoch": per_epoch,
        "fixed_total_seconds": {k: runs[k]["total"] for k in counts},
        "auto_total_seconds": auto["total"],
        "best_fixed": best,
        "total_ratio": auto["total"] / runs[best]["total"],
        "settled_from_epoch": settled_from,
        "settled_rate_ratio": rate(auto) / rate(runs[best_settled]),
        "best_settled_fixed": best_settled,
        "chosen": chosen,
        "tuning_cost": auto["total"] / runs[chosen]["total"] - 1 if chosen in runs else None,
        "switches": [
            {
                "batch": s.batch,
                "epoch": s.epoch,
                "from": s.from_workers,
                "to": s.to_workers,
                "seconds": round(s.seconds, 3),
                "reason": s.reason,
            }
            for s in switches
        ],
        "reason": tuning.tuning,
    }


def steady_wait(dataset: Any, workers: int, rate: float, *, batches: int) -> float:
    """The share of time a loop taking 1/rate s per batch waits, after the first round (worker
    start-up) and one more batch."""
    budget = max(workers, stoker.cpu_budget().cpus)  # so the planner keeps the count asked for
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        loader = stoker.make_loader(dataset, workers=workers, budget=budget, seed=0)
        it = iter(loader)
    wait = wall = 0.0
    for i in range(batches):
        asked = time.perf_counter()
        next(it)
        got = time.perf_counter()
        time.sleep(1.0 / rate)
        if i > max(workers, 1):
            wait += got - asked
            wall += time.perf_counter() - asked
    del it
    return wait / wall


def consumers(dataset: Any, counts: list[int], fixed_rates: dict[int, float]) -> list[Any]:
    per_epoch = len(stoker.make_loader(dataset, workers=0, budget=1))
    best = max(fixed_rates.values())
    limit = min(2 * per_epoch, 200)
    rows = []
    for label, rate in (
        ("slower than 1 worker", 0.5 * fixed_rates[1]),
        ("between", (fixed_rates[1] + best) / 2),
        ("faster than all", 2 * best),
    ):
        waits = {k: steady_wait(dataset, k, rate, batches=min(per_epoch, 60)) for k in counts}
        keepers = [k for k in counts if waits[k] <= KEEP_UP_WAIT]
        r = run(
            dataset,
            "auto",
            50,
            rate=rate,
            stop=lambda loader, n: loader._tuning.tuner.settled or n >= 2 * limit,
        )
        tuner = r["loader"]._tuning.tuner
        rows.append(
            {
                "consumer": label,
                "batches_per_second": rate,
                "wait_by_fixed_count": waits,
                "fewest_that_keep_up": keepers[0] if keepers else None,
                "auto_settled_on": tuner.decision.workers if tuner.settled else None,
                "auto_batches_to_settle": r["batches"],
                "limit_batches": limit,
                "reason": tuner.decision.reason,
            }
        )
        say(
            f"    consumer {rate:5.1f}/s ({label}): fixed waits "
            + ", ".join(f"{k}: {w:.0%}" for k, w in waits.items())
            + f"; auto settled on {rows[-1]['auto_settled_on']} after {r['batches']} batches"
        )
        say(f"      why: {tuner.decision.reason}")
    return rows


def say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="40,400", help="image counts, comma-separated")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-consumers", action="store_true")
    args = parser.parse_args(argv)
    budget = stoker.cpu_budget()
    counts = list(range(budget.cpus + 2))
    load = os.getloadavg()
    say(f"CPU budget {budget.cpus} ({budget.source}); load average {load[0]:.1f} at the start")
    report: dict[str, Any] = {"cpus": budget.cpus, "load_at_start": load[0], "sets": {}}
    for n, images in enumerate(int(s) for s in args.sets.split(",")):
        dataset = dataset_of(images)
        say(f"\n{images} images, {args.epochs} epochs, no consumer:")
        result = no_consumer(dataset, counts, args.epochs)
        fixed = result["fixed_total_seconds"]
        say(
            f"  auto {result['auto_total_seconds']:.1f} s, best fixed {result['best_fixed']} "
            f"workers {fixed[result['best_fixed']]:.1f} s: {result['total_ratio']:.3f}x "
            "(target <= 1.05)"
        )
        say(
            f"  settled epochs (from {result['settled_from_epoch']}): "
            f"{result['settled_rate_ratio']:.3f}x the best fixed count's rate (target >= 0.95)"
        )
        say(
            f"  auto settled on {result['chosen']} workers; cost of tuning {result['tuning_cost']:+.1%}"
        )
        for s in result["switches"]:
            say(f"    switch at batch {s['batch']} (epoch {s['epoch']}): {s['from']} -> {s['to']}")
        say(f"  why: {result['reason']}")
        if n == 0 and not args.no_consumers:
            per_epoch = result["batches_per_epoch"]
            rates = {k: per_epoch * args.epochs / t for k, t in fixed.items()}
            say("  simulated consumers:")
            result["consumers"] = consumers(dataset, counts[:-1], rates)
        report["sets"][images] = result
    report["load_at_end"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tune.json").write_text(json.dumps(report, indent=2, default=str))
    say(f"\nload average {report['load_at_end']:.1f} at the end; wrote {OUT / 'tune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
