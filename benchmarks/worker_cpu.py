"""Where the CPU goes at a fixed worker count: batches/s and the CPUs the main process and the
workers used, per stretch of batches (``/proc/<pid>/stat``, utime + stime).

``python benchmarks/worker_cpu.py [--images 40] [--workers 2] [--epochs 3] [--every 10]`` on the
set of ``benchmarks/tune.py`` (written there once). Live tuning rules out fewer workers from the
CPUs the workers used (docs/tuning.md, "fewer cannot use more CPU"); this shows the readings a
window sees, stretch by stretch, and the CPU each batch costs the main process and the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune import dataset_of  # noqa: E402

import stoker  # noqa: E402
from stoker.system.cpu import process_cpu_seconds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=10, help="batches per printed stretch")
    args = parser.parse_args(argv)
    dataset = dataset_of(args.images)
    budget = max(args.workers, stoker.cpu_budget().cpus)
    loader = stoker.make_loader(dataset, workers=args.workers, budget=budget, seed=0)
    it = iter(loader)
    for _ in range(max(args.workers, 1)):  # the first round: worker start-up, not counted
        next(it)
    pids = loader.worker_pids()

    def used() -> tuple[float, float]:
        main_cpu = process_cpu_seconds(os.getpid()) or 0.0
        return main_cpu, sum(process_cpu_seconds(p) or 0.0 for p in pids)

    print(f"{args.workers} workers, load average {os.getloadavg()[0]:.1f} at the start")
    began, start, n = time.perf_counter(), used(), 0
    t, c = began, start
    for epoch in range(args.epochs):
        for _batch in it if epoch == 0 else loader:
            n += 1
            if n % args.every == 0:
                now, u = time.perf_counter(), used()
                dt = now - t
                print(
                    f"  batches {n - args.every + 1:4}-{n:4}: {args.every / dt:5.1f}/s, main "
                    f"{(u[0] - c[0]) / dt:.2f} CPUs, workers {(u[1] - c[1]) / dt:.2f} CPUs"
                )
                t, c = now, u
    total, end = time.perf_counter() - began, used()
    print(
        f"all {n} batches: {n / total:.1f}/s; main {(end[0] - start[0]) / total:.2f} CPUs "
        f"({1000 * (end[0] - start[0]) / n:.1f} ms per batch), workers "
        f"{(end[1] - start[1]) / total:.2f} CPUs ({1000 * (end[1] - start[1]) / n:.1f} ms per "
        f"batch); load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
