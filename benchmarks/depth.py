"""Batches kept in flight against the worker count, with a training loop that takes batches at a
steady pace (issue #13's "between" consumer), side by side in one run.

One command: ``python benchmarks/depth.py`` (``--rounds 6 --batches 160`` by default; about 5
minutes on 2 CPUs). On the 40-image set of ``benchmarks/tune.py`` (0.3 to 12 MP sources,
resolution 1024, batch size 1), it first measures 1 worker's and the best count's rate with no
consumer (``--batches`` each), then runs a loop that sleeps ``1 / rate`` s per batch at the rate
halfway between them, with each worker count at two depths:

- **torch**: ``workers x prefetch_factor`` batches asked for ahead of the loop (torch's refill:
  one batch asked for per batch handed out; ``StokerLoader.in_flight = 0``);
- **stoker**: at least `torch_internals.IN_FLIGHT` (8) whatever the worker count, the default
  since session 6 (each hand-out tops the workers up).

Rounds are interleaved, each starting one setting later; per setting the median share of the
loop's time spent waiting (after the first round of worker start-up) and the median batches/s
it received, with their ranges. The figures behind `torch_internals.IN_FLIGHT`
(docs/tuning.md, "Session 6").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune import dataset_of, paced  # noqa: E402  # the same images, config and loop

from stoker import torch_internals  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=160, help="batches per run (4 epochs)")
    parser.add_argument("--counts", default="1,2,3", help="worker counts, comma-separated")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    dataset = dataset_of(40)
    alone = {k: paced(dataset, k, None, batches=args.batches)[1] for k in sorted({1, *counts})}
    rate = (alone[1] + max(alone.values())) / 2
    print(
        "no consumer, batches/s: "
        + ", ".join(f"{k} workers {r:.1f}" for k, r in alone.items())
        + f"; the loop takes {rate:.1f} batches/s (halfway between 1 worker and the best)",
        flush=True,
    )
    settings = [(k, depth) for k in counts for depth in (0, torch_internals.IN_FLIGHT)]
    results: dict[tuple[int, int], list[tuple[float, float]]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings[r % len(settings) :] + settings[: r % len(settings)]:
            results[s].append(paced(dataset, s[0], rate, batches=args.batches, in_flight=s[1]))
    print(f"median of {args.rounds} rounds of {args.batches} batches (range):")
    for (k, depth), got in results.items():
        waits, rates = [w for w, _ in got], [b for _, b in got]
        torch_depth = k * 2
        label = f"torch's {torch_depth}" if depth == 0 else f"{max(depth, torch_depth)}"
        print(
            f"  {k} workers, {label:>9} in flight: waited {statistics.median(waits):5.1%} "
            f"({min(waits):.0%}-{max(waits):.0%}), {statistics.median(rates):5.1f} batches/s "
            f"({min(rates):.1f}-{max(rates):.1f})",
            flush=True,
        )
    base = {k: statistics.median(b for _, b in results[(k, 0)]) for k in counts}
    deep = {
        k: statistics.median(b for _, b in results[(k, torch_internals.IN_FLIGHT)]) for k in counts
    }
    print(
        "deeper against torch's, batches/s: "
        + ", ".join(f"{k} workers x{deep[k] / base[k]:.3f}" for k in counts)
    )
    if 2 in counts and 3 in counts:
        print(
            f"3 workers against 2: torch's depth x{base[3] / base[2]:.3f}, "
            f"{torch_internals.IN_FLIGHT} in flight x{deep[3] / deep[2]:.3f}"
        )


if __name__ == "__main__":
    main()
