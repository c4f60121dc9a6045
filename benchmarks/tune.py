"""workers="auto" tuned live, against every fixed worker count, side by side in one run.

One command: ``python benchmarks/tune.py`` (``--sets 40 --epochs 3`` for a short development
run; ``--repeats 3`` for medians on a quiet machine). It writes the benchmark images of
``benchmarks/run.py`` (photo-like JPEGs and PNGs of 0.3 to 12 megapixels, seed 0) once under
``benchmarks/out/``, with a config as in issue 13: resolution 1024, batch size 1, one repeat.
Then, for each set (40 and 400 images):

1. **no consumer**: a run of ``--epochs`` epochs (10) with a loop that only takes batches, with
   every fixed count 0 .. budget+1, with ``workers="auto"`` and with no worker count at all (the
   default, which also tunes live), each with an empty cache (nothing remembered), interleaved
   (auto, default, 0, 1, ... per round, each round starting one setting later). Figures, for
   auto and for the default: total time (from ``make_loader`` to the last batch, worker
   start-up, switches and all) against the best fixed count (target <= 1.05x), and batches/s
   in the settled epochs (after the last switch) against the best fixed count's over the same
   epochs (target >= 0.95x);
2. **tuning cost**: the share of the tuned run's time lost against running the count it ended on
   from the start, ``1 - fixed(chosen) / tuned``: the exploration windows on other counts and the
   switches (target < 2%); from the reported (median) runs, and in brackets the median of the
   same ratio round by round (each tuned run against the fixed run of its count in the same
   round); and the CPU time the tuner's own bookkeeping took (``LiveTuning.observe``, timed);
3. **consumers** (the first set only): a training step simulated by sleeping at three rates
   (``consumer_rates``: slower than 1 worker on every batch, between 1 worker and the best,
   twice the best). Every fixed count runs with it first (four rounds, interleaved, the median;
   over 2 epochs where that takes at most about 3 s), to find the right count
   (``expected_count``: the fewest that keeps up, the loop waiting at most 5%; when none does,
   the fewest within 3% of the best rate); then auto runs with it until it settles: which count
   and after how many batches (target: the right count, within 2 epochs or 200 batches,
   whichever comes first).

It ends with one table of the ratios, both sets side by side, and the consumers' results.

The machine may be shared: every figure is one run (or a median of ``--repeats``), so say how
busy the machine was when you quote them. Results go to ``benchmarks/out/tune.json``; figures
for docs/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import build_dataset  # noqa: E402  # benchmarks/run.py: the same images
from vs_sd_scripts import CONFIG as SD_SCRIPTS_CONFIG  # noqa: E402

import stoker  # noqa: E402
from stoker.files import atomic_write_text  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
KEEP_UP_WAIT = 0.05
# Runs of each fixed count per consumer, for the right answer; the median counts. Session 5: 3
# workers on 2 CPUs waited 18.9%, 26.4% and 31.0% in three rounds with the "between" consumer
# (2 workers: 25.0 to 26.9%), so the mean of two rounds put either count first by chance.
FIXED_ROUNDS = 4

# The config of issue 13's measurements: the one the sd-scripts comparison uses, at batch size 1.
CONFIG = SD_SCRIPTS_CONFIG.format(batch_size=1, image_dir="2_photo")


def dataset_of(images: int) -> Any:
    root = OUT / f"tune-{images}"
    build_dataset(root, images=images)
    config = root / "tune.toml"
    config.write_text(CONFIG, encoding="utf-8")
    # Freshly written images may still be flushing to disk while the first run reads them
    # (session 2: the first tuned run on a new 400-image set ran its settled epochs at 0.73x
    # the fixed count it ended on; four later runs of the same setting, 0.9-1.0x). Flush, then
    # read each once, so that no setting pays for the write.
    os.sync()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            path.read_bytes()
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
        observed = [0.0]
        tuning = loader._tuning
        if tuning is not None:  # time the tuner's own bookkeeping, batch by batch
            observe = tuning.observe

            def timed_observe(*args: Any) -> None:
                # CPU time, not wall: with the workers on every CPU the main process is often
                # descheduled mid-call, which would charge the tuner for the wait it overlaps
                began_observe = time.thread_time()
                observe(*args)
                observed[0] += time.thread_time() - began_observe

            tuning.observe = timed_observe
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
    return {
        "epoch_seconds": epoch_seconds,
        "total": total,
        "batches": batches,
        "loader": loader,
        "observe_seconds": observed[0],
    }


TUNED = ("auto", "default")  # workers="auto" and no worker count at all (make_loader's default)


def no_consumer(dataset: Any, counts: list[int], epochs: int, repeats: int) -> dict[str, Any]:
    """Every fixed count, ``workers="auto"`` and the default, ``repeats`` rounds interleaved; each
    setting's run with the median total is the one reported."""
    per_epoch = len(stoker.make_loader(dataset, workers=0, budget=1))
    settings: list[Any] = [*TUNED, *counts]
    tries: dict[Any, list[dict[str, Any]]] = {k: [] for k in settings}
    for round_ in range(repeats):
        # interleaved, one of each per round, each round starting one setting later: session 5
        # found the setting run first in every round ("auto") 1 to 2% slower than its twin
        shift = round_ % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            workers = None if setting == "default" else setting
            tried = run(dataset, workers, epochs)
            if setting not in TUNED:
                tried["loader"] = None  # its persistent workers end now, not at the set's end
            tries[setting].append(tried)
            say(f"    {setting!s:>7}: {tries[setting][-1]['total']:.1f} s")
    runs = {k: sorted(v, key=lambda r: r["total"])[len(v) // 2] for k, v in tries.items()}
    best = min(counts, key=lambda k: runs[k]["total"])
    for setting, tried in tries.items():  # totals and end counts only: no loader kept twice
        runs[setting]["rounds"] = [
            (r["total"], setting if r["loader"] is None else r["loader"].num_workers) for r in tried
        ]
    result: dict[str, Any] = {
        "batches_per_epoch": per_epoch,
        "epochs": epochs,
        "repeats": repeats,
        "fixed_total_seconds": {k: runs[k]["total"] for k in counts},
        "fixed_epoch_seconds": {k: runs[k]["epoch_seconds"] for k in counts},
        "best_fixed": best,
    }
    for label in TUNED:
        result[label] = tuned_summary(runs, label, counts, per_epoch, epochs, best)
    return result


def tuned_summary(
    runs: dict[Any, Any], label: str, counts: list[int], per_epoch: int, epochs: int, best: int
) -> dict[str, Any]:
    """A tuned run against the fixed counts: total-time ratio, settled-epoch throughput ratio and
    the cost of tuning."""
    tuned = runs[label]
    loader = tuned["loader"]
    stats = loader.stats()
    switches = stats.switches
    settled = loader._tuning is not None and loader._tuning.tuner.settled
    # the settled epochs: those after the last switch (an epoch whose first batch came from the
    # new count counts as settled)
    if switches:
        last = switches[-1]
        settled_from = last.epoch if last.batch_in_epoch == 0 else last.epoch + 1
    else:
        settled_from = 0
    settled_from = min(settled_from, epochs - 1)

    def rate(r: dict[str, Any]) -> float:
        return per_epoch * (epochs - settled_from) / sum(r["epoch_seconds"][settled_from:])

    best_settled = max(counts, key=lambda k: rate(runs[k]))
    chosen = loader.num_workers
    # Tuning cost: what the run lost against running its final count from the start (the
    # exploration windows on other counts and the switches), as a share of the run.
    cost = 1 - runs[chosen]["total"] / tuned["total"] if chosen in runs else None
    # The same, round by round (each tuned run against the fixed run of its count in the same
    # round, minutes apart at most), the median: two identical settings' medians differ by the
    # run-to-run noise (session 5: 6.7 to 7.0 s for 2 workers on 40 images).
    paired = (
        statistics.median(
            1 - fixed / total
            for (total, ended), (fixed, _) in zip(
                tuned["rounds"], runs[chosen]["rounds"], strict=True
            )
            if ended == chosen
        )
        if chosen in runs and any(ended == chosen for _, ended in tuned["rounds"])
        else None
    )
    return {
        "total_seconds": tuned["total"],
        "total_ratio": tuned["total"] / runs[best]["total"],
        "settled": settled,
        "settled_from_epoch": settled_from,
        "settled_rate": rate(tuned),
        "best_settled_fixed": best_settled,
        "settled_rate_ratio": rate(tuned) / rate(runs[best_settled]),
        "chosen": chosen,
        "tuning_cost": cost,
        "tuning_cost_paired": paired,
        # CPU the tuner's own bookkeeping took in the main process (LiveTuning.observe, timed)
        "observe_seconds": tuned["observe_seconds"],
        "observe_share": tuned["observe_seconds"] / tuned["total"],
        "switches": [
            {
                "batch": s.batch,
                "epoch": s.epoch,
                "batch_in_epoch": s.batch_in_epoch,
                "from": s.from_workers,
                "to": s.to_workers,
                "seconds": round(s.seconds, 3),
                "reason": s.reason,
            }
            for s in switches
        ],
        "reason": stats.tuning,
    }


def steady_wait(dataset: Any, workers: int, rate: float, *, batches: int) -> float:
    """The share of time a loop taking 1/rate s per batch waits, after the first round (worker
    start-up) and one more batch."""
    return paced(dataset, workers, rate, batches=batches)[0]


def paced(
    dataset: Any, workers: int, rate: float | None, *, batches: int, in_flight: int | None = None
) -> tuple[float, float]:
    """``(wait share, batches/s)`` of a loop taking ``batches`` batches and sleeping ``1 / rate``
    s after each (``None``: no sleep), after the first round (worker start-up) and one more
    batch; ``in_flight``: the loader's ``in_flight`` (``None``: as built)."""
    budget = max(workers, stoker.cpu_budget().cpus)  # so the planner keeps the count asked for
    wait = wall = 0.0
    start_up = max(workers, 1)
    with warnings.catch_warnings():
        # torch's advice about more workers than CPUs (given when the first batch starts them):
        # budget+1 is measured on purpose
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        warnings.filterwarnings("ignore", category=stoker.InputBoundWarning)
        loader = stoker.make_loader(dataset, workers=workers, budget=budget, seed=0)
        if in_flight is not None:
            loader.in_flight = in_flight
        it = iter(loader)
        for i in range(batches):
            asked = time.perf_counter()
            try:
                next(it)
            except StopIteration:  # the next epoch, with the same (persistent) workers
                it = iter(loader)
                next(it)
            got = time.perf_counter()
            if rate:
                time.sleep(1.0 / rate)
            if i > start_up:
                wait += got - asked
                wall += time.perf_counter() - asked
        del it
    return wait / wall, (batches - start_up - 1) / wall


def slowest_load(dataset: Any) -> float:
    """The longest a single batch took to load, over one epoch with 0 workers (the main process
    loads each batch inside ``next()``, so each wait is one batch's load time)."""
    loader = stoker.make_loader(dataset, workers=0, budget=1, seed=0, monitor=False)
    longest = 0.0
    it = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            return longest
        longest = max(longest, time.perf_counter() - asked)


def consumer_rates(dataset: Any, fixed_rates: dict[int, float]) -> list[tuple[str, float]]:
    """The three simulated training steps, in batches/s.

    - slower than 1 worker: a step 1.25x the slowest batch's load (one epoch at 0 workers), so
      1 worker delivers every batch, the largest image's too, before the step ends. (Session 2
      used half of 1 worker's average rate: on this set one 12-megapixel image takes many times
      the average, so 1 worker fell behind on those and no count kept up with a consumer that
      was slower than 1 worker only on average.)
    - between: halfway between 1 worker's and the best fixed count's rate with no consumer;
    - faster than all: twice the best fixed count's rate.
    """
    best = max(fixed_rates.values())
    return [
        ("slower than 1 worker", 1.0 / (1.25 * slowest_load(dataset))),
        ("between", (fixed_rates[1] + best) / 2),
        ("faster than all", 2 * best),
    ]


def expected_count(waits: dict[int, float]) -> tuple[int, str]:
    """The right answer from the fixed runs, by the issue's rule: the fewest that keep up (the
    loop waits at most 5%); when none does, the best throughput, which for a loop taking a
    fixed step is the least waiting (rate = (1 - wait) / step), the fewest within 3% of it."""
    keepers = [k for k in sorted(waits) if waits[k] <= KEEP_UP_WAIT]
    if keepers:
        return keepers[0], "the fewest that keep up"
    top = max(1 - w for w in waits.values())
    fewest = min(k for k, w in waits.items() if 1 - w >= 0.97 * top)
    return fewest, "none keeps up: the fewest within 3% of the best rate"


def consumers(dataset: Any, counts: list[int], fixed_rates: dict[int, float]) -> list[Any]:
    per_epoch = len(stoker.make_loader(dataset, workers=0, budget=1))
    limit = min(2 * per_epoch, 200)
    rows = []
    for label, rate in consumer_rates(dataset, fixed_rates):
        # The right answer from fixed counts: FIXED_ROUNDS rounds, interleaved, the median, over
        # 2 epochs where that takes at most ~3 s (session 3 used one 40-batch run each; counts 2
        # and 3 then swapped places between runs; session 4's two rounds, averaged, as well).
        batches = min(2 * per_epoch, max(per_epoch, int(3 * rate)), 200)
        rounds = [
            {k: steady_wait(dataset, k, rate, batches=batches) for k in counts}
            for _ in range(FIXED_ROUNDS)
        ]
        waits = {k: statistics.median(r[k] for r in rounds) for k in counts}
        spread = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds)) for k in counts}
        expected, rule = expected_count(waits)
        r = run(
            dataset,
            "auto",
            50,
            rate=rate,
            stop=lambda loader, n: loader._tuning.tuner.settled or n >= 2 * limit,
        )
        tuner = r["loader"]._tuning.tuner
        settled_on = tuner.decision.workers if tuner.settled else None
        rows.append(
            {
                "consumer": label,
                "batches_per_second": rate,
                "wait_by_fixed_count": waits,
                "wait_range_by_fixed_count": spread,
                "expected": expected,
                "expected_rule": rule,
                "auto_settled_on": settled_on,
                "right": settled_on == expected,
                "auto_batches_to_settle": r["batches"],
                "limit_batches": limit,
                "within_limit": settled_on is not None and r["batches"] <= limit,
                "switches": [(s.from_workers, s.to_workers) for s in r["loader"].stats().switches],
                "reason": tuner.decision.reason,
            }
        )
        say(
            f"    consumer {rate:5.1f}/s ({label}): fixed waits (median of {FIXED_ROUNDS}, range) "
            + ", ".join(
                f"{k}: {w:.1%} ({spread[k][0]:.0%}-{spread[k][1]:.0%})" for k, w in waits.items()
            )
            + f"; expected {expected} ({rule}); auto settled on {settled_on} after "
            f"{r['batches']} batches (limit {limit})"
        )
        say(f"      why: {tuner.decision.reason}")
    return rows


def say(text: str = "") -> None:
    print(text, flush=True)


def print_set(images: int, result: dict[str, Any]) -> None:
    """One set's figures, side by side."""
    fixed = result["fixed_total_seconds"]
    best = result["best_fixed"]
    say(
        f"  {images} images, {result['epochs']} epochs x {result['batches_per_epoch']} batches, "
        f"no consumer (median of {result['repeats']}):"
    )
    say(f"    {'workers':>9} {'total s':>8} {'x best':>7}")
    for k, t in fixed.items():
        say(f"    {k:>9} {t:8.1f} {t / fixed[best]:7.3f}{'  <- best fixed' if k == best else ''}")
    for label in TUNED:
        r = result[label]
        say(f"    {label:>9} {r['total_seconds']:8.1f} {r['total_ratio']:7.3f}")
    for label in TUNED:
        r = result[label]
        cost = r["tuning_cost"]
        say(
            f"    {label}: total {r['total_ratio']:.3f}x the best fixed ({best} workers; target "
            f"<= 1.05); settled epochs {r['settled_from_epoch']}.. {r['settled_rate_ratio']:.3f}x "
            f"the best fixed rate ({r['best_settled_fixed']} workers; target >= 0.95); ended on "
            f"{r['chosen']} workers ({'settled' if r['settled'] else 'NOT settled'}); tuning "
            + ("cost n/a" if cost is None else f"cost {cost:.1%} of the run (target < 2%)")
            + (
                ""
                if r["tuning_cost_paired"] is None
                else f", {r['tuning_cost_paired']:.1%} round by round"
            )
            + f"; the tuner's own bookkeeping {r['observe_seconds'] * 1e3:.0f} ms of CPU "
            f"({r['observe_share']:.2%} of the run's time)"
        )
        for s in r["switches"]:
            say(
                f"      switch at batch {s['batch']} (epoch {s['epoch']}, batch "
                f"{s['batch_in_epoch']}): {s['from']} -> {s['to']}"
            )
        say(f"      why: {r['reason']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="40,400", help="image counts, comma-separated")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per setting, interleaved; the median counts"
    )
    parser.add_argument("--no-consumers", action="store_true")
    args = parser.parse_args(argv)
    budget = stoker.cpu_budget()
    counts = list(range(budget.cpus + 2))
    load = os.getloadavg()
    say(f"CPU budget {budget.cpus} ({budget.source}); load average {load[0]:.1f} at the start")
    report: dict[str, Any] = {"cpus": budget.cpus, "load_at_start": load[0], "sets": {}}
    sets = [int(s) for s in args.sets.split(",")]
    for n, images in enumerate(sets):
        dataset = dataset_of(images)
        say(f"\n{images} images, {args.epochs} epochs, no consumer:")
        result = no_consumer(dataset, counts, args.epochs, args.repeats)
        print_set(images, result)
        if n == 0 and not args.no_consumers:
            per_epoch = result["batches_per_epoch"]
            fixed = result["fixed_total_seconds"]
            rates = {k: per_epoch * args.epochs / t for k, t in fixed.items()}
            say("  simulated consumers:")
            result["consumers"] = consumers(dataset, counts, rates)
        report["sets"][images] = result
        report["load_after_" + str(images)] = os.getloadavg()[0]
    say("\nSide by side (no consumer; targets: total <= 1.05x, settled >= 0.95x, cost < 2%):")
    say(
        f"  {'set':>5} {'tuned':>8} {'total x best':>13} {'settled x best':>15} "
        f"{'cost (by round)':>16} {'on':>3}"
    )
    for images in sets:
        result = report["sets"][images]
        for label in TUNED:
            r = result[label]
            cost = "n/a" if r["tuning_cost"] is None else f"{r['tuning_cost']:.1%}"
            if r["tuning_cost_paired"] is not None:
                cost += f" ({r['tuning_cost_paired']:.1%})"
            say(
                f"  {images:>5} {label:>8} {r['total_ratio']:13.3f} "
                f"{r['settled_rate_ratio']:15.3f} {cost:>16} {r['chosen']:>3}"
            )
    rows = report["sets"][sets[0]].get("consumers", [])
    for row in rows:
        say(
            f"  consumer {row['batches_per_second']:.1f}/s ({row['consumer']}): expected "
            f"{row['expected']} ({row['expected_rule']}), auto settled on "
            f"{row['auto_settled_on']} ({'right' if row['right'] else 'WRONG'}) after "
            f"{row['auto_batches_to_settle']} batches (limit {row['limit_batches']}: "
            f"{'met' if row['within_limit'] else 'NOT met'})"
        )
    if rows:
        say(
            f"  consumers: right count in {sum(r['right'] for r in rows)} of {len(rows)}, "
            f"settled within the limit in {sum(r['within_limit'] for r in rows)} of {len(rows)}"
        )
    report["load_at_end"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "tune.json", json.dumps(report, indent=2, default=str))
    say(f"\nload average {report['load_at_end']:.1f} at the end; wrote {OUT / 'tune.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
