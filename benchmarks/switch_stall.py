"""What a live-tuning switch costs the training loop: its waits around a forced mid-epoch switch.

One command: ``python benchmarks/switch_stall.py`` (``--trials 3 --images 24``). A loader starts
with ``--from`` workers (1) and is told to switch to ``--to`` (2) after ``--at`` batches (12) of
the first epoch; the loop takes each batch and sleeps ``--step`` seconds (0.02, a training
step). Printed per trial: the median wait of the batches before the switch, the longest wait of
the batches after it and the **extra wait**: what the batches after the switch waited beyond
that median, summed over the next ``WATCHED`` (10) batches (a free switch would be 0; the batches the old
workers hand over arrive at the old rate, the new workers' first round pays their start).
Images: ``stoker.data.synthetic`` (``--resolution`` 768), written once to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stoker
from stoker.autotune import Decision, LiveTuner
from stoker.autotune.driver import LiveTuning, live_plan
from stoker.data.synthetic import write_sample_dataset
from stoker.planning import plan_request

# Batches after the switch whose waits are added up: the old workers' hand-over (at most
# workers x prefetch_factor) and the new workers' first rounds.
WATCHED = 10


class Forced(LiveTuner):
    """Switches to ``to`` once, when ``at`` batches were handed out; the timings are ignored."""

    def __init__(self, start: int, to: int, at: int) -> None:
        super().__init__(start=start, candidates=sorted({0, start, to}))
        self.to, self.at, self.seen = to, at, 0

    def observe(self, wait_seconds: float, step_seconds: float, samples: int = 1) -> Any:
        self.seen += 1
        if self.seen != self.at:
            return None
        self.decision = Decision(workers=self.to, switch=True, settled=True, reason="forced")
        return self.decision


def trial(dataset: Any, args: argparse.Namespace) -> dict[str, float]:
    budget = max(args.to, getattr(args, "from"), 2)
    start = getattr(args, "from")
    loader = stoker.make_loader(dataset, seed=0, workers=start, budget=budget, monitor=False)
    request = stoker.LoaderRequest(workers="auto")
    tuner = Forced(start, args.to, args.at)

    def plan_for(fixed: Any) -> Any:
        return plan_request(fixed, budget=budget, warn=False)

    loader._tuning = LiveTuning(tuner=tuner, request=request, plan_for=plan_for)
    loader.plan = live_plan(request, start, tuner.decision, plan_for)
    waits = []
    it = iter(loader)
    while len(waits) < args.at + WATCHED:
        asked = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - asked)
        time.sleep(args.step)
    at = args.at
    before = statistics.median(waits[max(start, 1) + 1 : at])
    after = waits[at : at + WATCHED]
    return {
        "median_wait_before": before,
        "longest_wait_after": max(after),
        "extra_wait": sum(max(w - before, 0.0) for w in after),
        "batches_after": len(after),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--from", type=int, default=1)
    parser.add_argument("--to", type=int, default=2)
    parser.add_argument("--at", type=int, default=12)
    parser.add_argument("--step", type=float, default=0.02)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        sample = write_sample_dataset(Path(root), images=args.images, resolution=args.resolution)
        dataset = stoker.load_dataset(sample.config, progress=lambda d, t: None)
        print(
            f"switch {getattr(args, 'from')} -> {args.to} workers after {args.at} batches, "
            f"step {args.step * 1000:.0f} ms, {args.images} images; load average "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        rows = []
        for n in range(args.trials):
            row = trial(dataset, args)
            rows.append(row)
            print(
                f"  trial {n}: median wait before {row['median_wait_before'] * 1000:.0f} ms, "
                f"longest after {row['longest_wait_after'] * 1000:.0f} ms, extra wait "
                f"{row['extra_wait'] * 1000:.0f} ms over {row['batches_after']:.0f} batches",
                flush=True,
            )
        extra = statistics.median(r["extra_wait"] for r in rows)
        print(f"median extra wait per switch: {extra * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
