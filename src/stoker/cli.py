"""The ``stoker`` command: a thin layer over the public API.

Each subcommand parses its options, calls one public function and renders the result, as text or
with ``--json`` as one JSON object. Exit codes: 0 OK, 1 problems found, 2 usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stoker
from stoker.errors import StokerError

_DESCRIPTION = """\
stoker keeps the GPU fed: DataLoader settings sized to the real CPU budget of this process
(affinity, cgroup quotas, SLURM, ranks per node), explained, and never invalid."""


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _print_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2))


# --- doctor --------------------------------------------------------------------------------------


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        default=None,
        metavar="N|auto",
        help="worker processes you would ask for (default: chosen from the budget)",
    )
    parser.add_argument(
        "--persistent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep workers alive between epochs (persistent_workers)",
    )
    parser.add_argument(
        "--prefetch-factor",
        type=int,
        default=None,
        metavar="N",
        help="batches each worker loads ahead",
    )
    parser.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="page-locked batches for faster copies to the GPU",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="seconds to wait for a worker's batch (0 = forever)",
    )
    parser.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None)


def _workers_arg(text: str | None) -> Any:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        return text  # the planner's ValueError names the setting and what is accepted


def _plan_from_args(args: argparse.Namespace, budget: stoker.Budget) -> stoker.LoaderPlan:
    return stoker.plan_loader(
        workers=_workers_arg(args.workers),
        persistent=args.persistent,
        prefetch_factor=args.prefetch_factor,
        pin_memory=args.pin_memory,
        timeout=args.timeout,
        start_method=args.start_method,
        budget=budget,
        warn=False,
    )


def _render_budget(budget: stoker.Budget) -> list[str]:
    lines = [
        f"CPU budget: {budget.cpus} CPU{'s' if budget.cpus != 1 else ''} for this process"
        f" ({budget.source})"
    ]
    if budget.local_ranks > 1:
        lines.append(f"  node total {budget.node_cpus} CPUs shared by {budget.local_ranks} ranks")
    lines.append("  limits checked:")
    for lim in budget.limits:
        cpus = "-" if lim.cpus is None else f"{lim.cpus:g}"
        lines.append(f"    {lim.kind:<10} {cpus:>6}  {lim.detail}  [{lim.where}: {lim.raw}]")
    return lines


def _render_plan(plan: stoker.LoaderPlan) -> list[str]:
    lines = ["DataLoader settings:"]
    lines += [f"  {k} = {v!r}" for k, v in plan.kwargs.items()]
    if plan.adjustments:
        lines.append("Changed from what you asked:")
        lines += [
            f"  {a.setting}: {a.requested!r} -> {a.chosen!r}: {a.reason}" for a in plan.adjustments
        ]
    if plan.defaults:
        lines.append("Chosen for you:")
        lines += [f"  {a.setting} = {a.chosen!r}: {a.reason}" for a in plan.defaults]
    return lines


def _recommended(plan: stoker.LoaderPlan) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in plan.kwargs.items())
    return f"DataLoader(dataset, batch_size=..., {args})"


def _run_doctor(args: argparse.Namespace) -> int:
    budget = stoker.cpu_budget()
    plan = _plan_from_args(args, budget)
    if args.json:
        _print_json(
            {
                "cpus": budget.cpus,
                "node_cpus": budget.node_cpus,
                "local_ranks": budget.local_ranks,
                "source": budget.source,
                "limits": budget.limits,
                "plan": plan.kwargs,
                "adjustments": plan.adjustments,
                "defaults": plan.defaults,
                "recommended": _recommended(plan),
            }
        )
        return 0
    lines = _render_budget(budget) + [""] + _render_plan(plan)
    lines += [
        "",
        "Recommended:",
        f"  {_recommended(plan)}",
        "  or let stoker build it: stoker.make_loader(dataset, batch_size=..., "
        f"workers={plan.num_workers})",
    ]
    print("\n".join(lines))
    return 0


# --- demo ----------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    from stoker.data.synthetic import write_sample_dataset

    out = Path(args.out)
    sample = write_sample_dataset(out, images=args.images, seed=0)
    print(f"Wrote a sample dataset of {sample.images} images to {sample.root}\n")
    budget = stoker.cpu_budget()
    plan = _plan_from_args(args, budget)
    print("\n".join(_render_budget(budget) + [""] + _render_plan(plan)))
    print(f"\nLoading it with stoker.make_loader(workers={plan.request.workers!r}) ...")
    return _demo_load(sample.config, plan)


def _demo_load(config: Path, plan: stoker.LoaderPlan) -> int:
    dataset = stoker.load_dataset(config)
    report = dataset.report
    print(
        f"  {report.images} images, {report.samples_per_epoch} samples per epoch with repeats "
        f"and regularisation balancing, {len(report.buckets[0].buckets)} buckets"
    )
    loader = stoker.make_loader(
        dataset, shuffle=True, seed=0, budget=plan.budget, **_plan_settings(plan)
    )
    chosen = next((a for a in loader.plan.defaults if a.setting == "workers"), None)
    why = f": {chosen.reason}" if chosen is not None else ""
    print(f"  workers = {loader.plan.num_workers}{why}")
    start = time.perf_counter()
    count = 0
    for epoch in range(2):
        for batch in loader:
            count += len(batch["captions"])
        print(
            f"  epoch {epoch}: {len(loader)} batches; last: images "
            f"{tuple(batch['images'].shape)}, captions {batch['captions']}"
        )
    seconds = time.perf_counter() - start
    print(f"Loaded {count} samples in {seconds:.2f} s ({count / seconds:.1f} samples/s).")
    stats = loader.stats()
    print(
        f"The loop waited {stats.wait_seconds:.2f} s for data ({stats.wait_fraction:.0%} of the "
        "time; it does nothing else here, so this is the loader's own pace)."
    )
    print(
        "Next: stoker scan, stoker tune and stoker bench on your own dataset "
        f"(try: stoker scan {config})."
    )
    return 0


def _plan_settings(plan: stoker.LoaderPlan) -> dict[str, Any]:
    req = plan.request
    return {
        "workers": req.workers,
        "persistent": req.persistent,
        "prefetch_factor": req.prefetch_factor,
        "pin_memory": req.pin_memory,
        "timeout": req.timeout,
        "start_method": req.start_method,
    }


# --- scan ----------------------------------------------------------------------------------------


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="dataset config (.toml/.json), train_data_dir, or fine-tuning metadata (.json/.jsonl)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training resolution, when the source does not set it",
    )
    parser.add_argument(
        "--reg-data-dir", default=None, help="regularisation folders, for a train_data_dir source"
    )
    parser.add_argument("--image-dir", default=None, help="images of a metadata source")


def _load_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    return stoker.load_dataset(
        args.source,
        resolution=args.resolution,
        reg_data_dir=args.reg_data_dir,
        image_dir=args.image_dir,
        **kwargs,
    )


def _run_scan(args: argparse.Namespace) -> int:
    dataset = _load_from_args(args, on_error="skip")
    report = dataset.report
    if args.json:
        _print_json(report)
        return 1 if report.problems else 0
    print("\n".join(_render_report(report)))
    return 1 if report.problems else 0


def _render_report(report: Any) -> list[str]:
    lines = [
        f"{report.images} images, {report.samples_per_epoch} samples per epoch "
        f"(with repeats), {report.batches_per_epoch} batches per epoch"
    ]
    lines.append("Subsets:")
    for sub in report.subsets:
        kind = "reg  " if sub.is_reg else "train"
        lines.append(
            f"  {kind} {sub.images:>6} images x{sub.num_repeats:<3} -> "
            f"{sub.samples_per_epoch:>7} samples  {sub.folder}"
            + (f"  ({sub.missing_captions} without caption)" if sub.missing_captions else "")
        )
    lines += [f"Note: {note}" for note in report.notes]
    for d, buckets in enumerate(report.buckets):
        lines.append(f"Buckets of dataset {d + 1} (mean aspect error {buckets.mean_ar_error:.4f}):")
        for b in buckets.buckets:
            lines.append(
                f"  {b.width:>5} x {b.height:<5} {b.count:>7} images  "
                f"aspect error {b.mean_ar_error:+.4f}"
            )
    if report.problems:
        lines.append(f"Problems ({len(report.problems)}):")
        lines += [f"  {p.path}: {p.reason} [{p.action}]" for p in report.problems]
    else:
        lines.append("No problems found.")
    return lines


# --- bench ---------------------------------------------------------------------------------------


def _bench_workers(text: str, budget_cpus: int) -> list[int]:
    if text == "auto":
        return list(range(budget_cpus + 1))
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise ValueError(
            f"--workers {text!r} is not valid: use worker counts such as 0,1,2 or 'auto' "
            f"(0 to the CPU budget, {budget_cpus})"
        )
    return counts


def _run_bench(args: argparse.Namespace) -> int:
    from stoker.bench import bench_loader, plot_bench, require_plotting
    from stoker.data.catalog import stderr_progress

    if args.plot:
        require_plotting()  # fail before minutes of measuring, not after
    budget = stoker.cpu_budget()
    workers = _bench_workers(args.workers, budget.cpus)
    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches} is not valid: use a whole number >= 1")
    # Enough batches that the prefetch warm-up (workers x 2 batches) is a small part of the run.
    batches = args.batches or max(10, 6 * max(workers))
    dataset = _load_from_args(args, on_error="skip", output=args.output)
    report = bench_loader(
        dataset,
        workers=workers,
        batches=batches,
        start_methods=(args.start_method,),
        repeats=args.repeats,
        source=str(args.source),
        budget_cpus=budget.cpus,
        progress=stderr_progress("stoker: bench"),
    )
    if args.plot:
        plot_bench(report, args.plot)
    if args.json:
        _print_json(report)
        return 0
    print("\n".join(_render_bench(report, args.plot)))
    return 0


def _render_bench(report: Any, plot: str | None) -> list[str]:
    mib = 2**20
    lines = [
        f"{report.source}: CPU budget {report.budget_cpus}, "
        f"{report.measurements[0].batches} batches per run, {report.repeats} run(s) each (median)",
        "  workers  start   images/s  first batch s  workers PSS MiB  total PSS MiB",
    ]
    for m in report.measurements:
        workers_pss = "-" if m.worker_pss_bytes is None else f"{m.worker_pss_bytes / mib:.0f}"
        total_pss = "-" if m.total_pss_bytes is None else f"{m.total_pss_bytes / mib:.0f}"
        lines.append(
            f"  {m.workers:>7}  {m.start_method or '-':<6} {m.images_per_second:9.1f} "
            f"{m.first_batch_seconds:14.2f} {workers_pss:>16} {total_pss:>14}"
        )
    best = report.best()
    lines.append(f"Fastest: {best.workers} workers ({best.images_per_second:.1f} images/s).")
    if plot:
        lines.append(f"Plot: {plot}")
    return lines


# --- tune ----------------------------------------------------------------------------------------


def _run_tune(args: argparse.Namespace) -> int:
    dataset = _load_from_args(args)
    result = stoker.tune_loader(
        dataset,
        request=stoker.LoaderRequest(workers="auto"),
        consumer_rate=args.consumer_rate,
        seed=dataset.seed,
        cache=not args.no_cache,
    )
    if args.json:
        _print_json(result)
    else:
        print("\n".join(_render_tune(result, args.source)))
    return 1 if result.failure else 0


def _render_tune(result: Any, source: str) -> list[str]:
    budget, memory = result.plan.budget, result.memory
    gib = "unknown" if memory.usable_bytes is None else f"{memory.usable_bytes / 2**30:.1f} GiB"
    lines = [
        f"Measured {source} on a CPU budget of {budget.cpus} ({budget.source}); "
        f"memory for workers: {gib} ({memory.source})",
        "   workers  prefetch  batches/s  samples/s  first batch  MiB/worker  note",
    ]
    chosen = (result.plan.num_workers, result.plan.prefetch_factor)
    for m in result.measurements:
        mark = "*" if (m.workers, m.prefetch_factor) == chosen else " "
        mib = "-" if m.worker_memory_bytes is None else f"{m.worker_memory_bytes / 2**20:.0f}"
        lines.append(
            f" {mark} {m.workers:>7}  {m.prefetch_factor or '-':>8}  {m.batches_per_second:>9.1f}"
            f"  {m.samples_per_second:>9.1f}  {m.first_batch_seconds:>9.2f} s  {mib:>10}  {m.note}"
        )
    lines.append(f"Choice: workers={result.plan.num_workers}: {result.choice.reason}")
    if result.cached:
        lines.append(f"Remembered choice ({result.seconds * 1000:.0f} ms): {result.cache_path}")
    else:
        where = f"; remembered in {result.cache_path}" if result.cache_path else ""
        lines.append(
            f"Probe: {result.probe_seconds:.1f} s (limit {result.time_limit_seconds:.1f} s){where}"
        )
    lines.append(
        "Use it: stoker.make_loader(dataset, workers='auto'"
        + (f", consumer_rate={result.consumer_rate:g}" if result.consumer_rate else "")
        + ") reuses this choice"
    )
    return lines


def _add_tune_parser(sub: Any) -> None:
    tune = sub.add_parser(
        "tune",
        help="measure worker counts on your dataset and choose the fewest that keep up",
        description="Run the loader training would use, tuning its workers live as "
        "make_loader(dataset, workers='auto') does, over up to two epochs with no training "
        "step (or one of --consumer-rate batches/s, simulated), print what each worker count "
        "delivered, and remember the choice as the next run's starting point. Rules: "
        "docs/tuning.md.",
    )
    _add_source_options(tune)
    tune.add_argument(
        "--consumer-rate",
        type=float,
        default=None,
        metavar="R",
        help="batches/s your training step takes (choose the fewest workers that keep up)",
    )
    tune.add_argument(
        "--no-cache", action="store_true", help="measure even if a choice is remembered"
    )
    tune.add_argument("--json", action="store_true", help="print the result as JSON")
    tune.set_defaults(run=_run_tune)


# --- main ----------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stoker",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"stoker {stoker.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = sub.add_parser(
        "doctor",
        help="show the CPU budget, every limit found, and the loader plan",
        description="Show the CPU budget of this process with every limit and where it was read, "
        "then the DataLoader settings stoker plans for your request and why.",
    )
    _add_plan_options(doctor)
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(run=_run_doctor)

    scan = sub.add_parser(
        "scan",
        help="scan a dataset: counts, buckets, bad files",
        description="Scan an sd-scripts dataset as training would: subsets, image and repeat "
        "counts, regularisation balancing, missing captions, bad files with reasons, "
        "and the bucket table. Exit code 1 when problems were found.",
    )
    _add_source_options(scan)
    scan.add_argument("--json", action="store_true", help="print the report as JSON")
    scan.set_defaults(run=_run_scan)

    demo = sub.add_parser(
        "demo",
        help="write a small sample dataset and load it",
        description="Write a small sd-scripts-style sample dataset, show the plan, and load it "
        "for two epochs with stoker's loader.",
    )
    demo.add_argument("--out", default="stoker-demo", help="folder for the sample dataset")
    demo.add_argument("--images", type=int, default=24, help="images to write")
    _add_plan_options(demo)
    demo.set_defaults(run=_run_demo)
    _add_bench_parser(sub)
    _add_tune_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure loader throughput and memory on your dataset",
        description="Load your dataset with several worker counts and measure images/s (steady, "
        "after the prefetch warm-up), time to first batch, and the memory (PSS) of the main "
        "process and the workers. Figures for this machine: docs/performance.md.",
    )
    _add_source_options(bench)
    bench.add_argument(
        "--workers",
        default="auto",
        metavar="0,1,2|auto",
        help="worker counts to measure (auto: 0 to the CPU budget)",
    )
    bench.add_argument(
        "--batches", type=int, default=None, help="batches per run (default: 6 x most workers)"
    )
    bench.add_argument("--repeats", type=int, default=1, help="runs per setting (median kept)")
    bench.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None)
    bench.add_argument(
        "--output", choices=("float", "uint8"), default="float", help="images as float or uint8"
    )
    bench.add_argument("--plot", default=None, metavar="PNG", help="write a plot (matplotlib)")
    bench.add_argument("--json", action="store_true", help="print the measurements as JSON")
    bench.set_defaults(run=_run_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stoker`` command line; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (StokerError, ValueError) as err:
        if args.debug:
            raise
        print(f"stoker: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, StokerError) else 2


if __name__ == "__main__":
    sys.exit(main())
