"""The ``stoker`` command: a thin layer over the public API.

Each subcommand parses its options, calls one public function and renders the result, as text or
with ``--json`` as one JSON object. Exit codes: 0 OK, 1 problems found, 2 usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stoker
from stoker.cli_common import SOURCE_FLAGS, jsonable, load_from_args, print_json
from stoker.errors import StokerError

_DESCRIPTION = """\
stoker keeps the GPU fed: DataLoader settings sized to the real CPU budget of this process
(affinity, cgroup quotas, SLURM, ranks per node), explained, and never invalid."""


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
    parser.add_argument(
        "--start-method",
        choices=("fork", "spawn", "forkserver"),
        default=None,
        help="how worker processes start (multiprocessing_context; default: the platform's)",
    )


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
    lines = [f"CPU budget: {_plural(budget.cpus, 'CPU')} for this process ({budget.source})"]
    if budget.local_ranks > 1:
        lines.append(
            f"  node total {_plural(budget.node_cpus, 'CPU')} shared by {budget.local_ranks} ranks"
        )
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
        print_json(
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

    out = _demo_folder(args.out)
    if args.images < 1:
        raise ValueError(f"--images {args.images} is not valid: use a whole number >= 1")
    try:
        sample = write_sample_dataset(out, images=args.images, seed=0)
    except OSError as err:
        raise StokerError(
            f"--out {args.out}: could not write the sample dataset ({err.strerror or err}"
            f"{': ' + str(err.filename) if err.filename else ''}); give a folder you can write"
        ) from None
    print(f"Wrote a sample dataset of {_plural(sample.images, 'image')} to {sample.root}\n")
    budget = stoker.cpu_budget()
    request = _plan_from_args(args, budget).request  # checks the flags before loading anything
    print("\n".join(_render_budget(budget)))
    return _demo_load(sample.config, request, budget)


def _demo_folder(text: str) -> Path:
    """The demo's folder; the sample writer itself refuses to replace anyone's files."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise StokerError(f"--out {text} is a file; give a folder for the sample dataset")
    return out


def _demo_load(config: Path, request: stoker.LoaderRequest, budget: stoker.Budget) -> int:
    dataset = stoker.load_dataset(config)
    report = dataset.report
    print(
        f"  {_plural(report.images, 'image')}, {report.samples_per_epoch} samples per epoch "
        f"with repeats and regularisation balancing, "
        f"{_plural(len(report.buckets[0].buckets), 'bucket')}"
    )
    print(f"\nLoading it with stoker.make_loader(workers={request.workers!r}) ...")
    loader = stoker.make_loader(
        dataset,
        shuffle=True,
        seed=0,
        budget=budget,
        workers=request.workers,
        persistent=request.persistent,
        prefetch_factor=request.prefetch_factor,
        pin_memory=request.pin_memory,
        timeout=request.timeout,
        start_method=request.start_method,
    )
    # The plan the loader was built with (after measuring, for workers="auto").
    print("\n".join(_render_plan(loader.plan)))
    start = time.perf_counter()
    count = 0
    for epoch in range(2):
        for batch in loader:
            count += len(batch["captions"])
        print(
            f"  epoch {epoch}: {_plural(len(loader), 'batch', 'batches')}; last: images "
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
    parser.add_argument(
        "--links-outside",
        action="store_true",
        help="follow symlinks and metadata keys that lead out of the dataset folders (a symlink "
        "farm); by default they are skipped and reported as outside_root",
    )
    options = parser.add_argument_group(
        "dataset options",
        "sd-scripts' dataset settings for sources that do not set them (a config's own values "
        "win, as with sd-scripts' command line)",
    )
    options.add_argument(
        "--caption-extension",
        default=None,
        metavar="EXT",
        help="caption file extension, e.g. .txt (sd-scripts' default: .caption)",
    )
    options.add_argument(
        "--enable-bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="aspect-ratio buckets (without them every image is cropped to the resolution)",
    )
    options.add_argument("--batch-size", type=int, default=None, metavar="N", help="batch size")
    for flag, what in (
        ("--min-bucket-reso", "smallest bucket side, in pixels"),
        ("--max-bucket-reso", "largest bucket side, in pixels"),
        ("--bucket-reso-steps", "bucket sides are multiples of this"),
    ):
        options.add_argument(flag, type=int, default=None, metavar="N", help=what)
    options.add_argument(
        "--bucket-no-upscale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="never enlarge an image to fit a bucket",
    )
    options.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="settings",
        help="any other dataset or subset key, with a TOML value: --set shuffle_caption=true "
        "--set keep_tokens=1 --set 'face_crop_aug_range=[2.0, 4.0]' (repeatable)",
    )


def _say_load_warnings(args: argparse.Namespace, shown: Sequence[str] = ()) -> None:
    """Print each load warning once to stderr, unless the rendered report already says it."""
    for message in getattr(args, "load_warnings", []):
        if not any(_same_news(message, note) for note in shown):
            print(f"stoker: warning: {message}", file=sys.stderr)


def _same_news(warning: str, note: str) -> bool:
    # The skipped-folder warning and the report's note name the same folders in other words.
    return (
        warning in note or note in warning or ("left out" in warning and "skipped folder" in note)
    )


def _cli_words(message: str) -> str:
    """A library message in the command line's words: keyword arguments become flags."""
    for keyword, flag in (
        ("resolution=", "--resolution"),
        ("reg_data_dir=", "--reg-data-dir"),
        ("image_dir=", "--image-dir"),
    ):
        message = message.replace(f"give {keyword}", f"give {flag}")
    if message.startswith("overrides: "):
        message = "command line: " + message.removeprefix("overrides: ")
        for key, flag in SOURCE_FLAGS.items():
            message = re.sub(rf"\b{key}\b", flag, message)
    return message


def _run_scan(args: argparse.Namespace) -> int:
    from stoker.cli_cache import render_cache_state
    from stoker.data.scan_checks import check_dataset

    dataset = load_from_args(args, on_error="skip", latent_cache=False, text_cache=False)
    report = dataset.report
    findings = check_dataset(dataset)
    failed = bool(report.problems) or any(f.serious for f in findings)
    latent = args.latent_cache or dataset.datasets[0].latent_cache
    text = args.text_cache or dataset.datasets[0].text_cache
    if args.json:
        caches = stoker.check_caches(dataset, latent_cache=latent, text_cache=text)
        print_json({**jsonable(report), "findings": findings, "caches": caches})
        return 1 if failed else 0
    _say_load_warnings(args, report.notes)
    lines = report.lines() + render_cache_state(dataset, latent, text)
    for finding in findings:
        fix = ""
        if finding.key in SOURCE_FLAGS:
            fix = f"; use {SOURCE_FLAGS[finding.key]} {finding.value} or set it in the config"
        lines.append(f"{'Problem' if finding.serious else 'Warning'}: {finding.message}{fix}")
    if not failed:
        lines.append("No problems found.")
    print("\n".join(lines))
    return 1 if failed else 0


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
    from stoker.bench import bench_loader, plot_bench, require_plotting, steady_batches_needed
    from stoker.progress import progress_bar

    plot = _check_plot_path(args.plot) if args.plot else None
    if plot is not None:
        require_plotting()  # fail before minutes of measuring, not after
    budget = stoker.cpu_budget()
    workers = _bench_workers(args.workers, budget.cpus)
    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches {args.batches} is not valid: use a whole number >= 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} is not valid: use a whole number >= 1")
    # Enough batches that batches queued ahead cannot inflate the rate (bench.steady_batches_needed).
    batches = args.batches or max(steady_batches_needed(w) for w in workers)
    dataset = load_from_args(args, on_error="skip", output=args.output)
    _say_load_warnings(args)
    report = bench_loader(
        dataset,
        workers=workers,
        batches=batches,
        start_methods=(args.start_method,),
        repeats=args.repeats,
        source=str(args.source),
        budget_cpus=budget.cpus,
        progress=progress_bar("stoker: bench", unit="batches"),
    )
    planned = stoker.plan_loader(budget=budget, warn=False).num_workers
    if args.json:
        print_json(report)
    else:
        print("\n".join(_render_bench(report, planned)))
    if plot is not None:
        try:
            plot_bench(report, plot, planned_workers=planned)
        except OSError as err:
            raise StokerError(f"--plot {plot}: could not write the plot: {err.strerror}") from None
        if not args.json:
            print(f"Plot: {plot}")
    return 0


def _check_plot_path(text: str) -> Path:
    """The plot's path, checked before measuring: its folder exists and can be written."""
    path = Path(text)
    folder = path.parent
    if not folder.is_dir():
        raise StokerError(
            f"--plot {text}: the folder {folder} does not exist; create it or pick another path"
        )
    if path.is_dir():
        raise StokerError(f"--plot {text} is a folder; give a file name such as bench.png")
    if not os.access(folder, os.W_OK):
        raise StokerError(f"--plot {text}: the folder {folder} cannot be written")
    return path


def _render_bench(report: Any, planned_workers: int | None = None) -> list[str]:
    from stoker.bench import steady_batches_needed

    mib = 2**20
    first = report.measurements[0]
    lines = [
        f"{report.source}: CPU budget {_plural(report.budget_cpus, 'CPU')}, "
        f"{_plural(first.batches, 'batch', 'batches')} per run (the first workers x 2 are "
        f"warm-up, not timed), {_plural(report.repeats, 'run')} per setting",
        "   workers  start   images/s  lowest-highest  first batch s  workers MiB  total MiB",
    ]
    for m in report.measurements:
        workers_pss = "-" if m.worker_pss_bytes is None else f"{m.worker_pss_bytes / mib:.0f}"
        total_pss = "-" if m.total_pss_bytes is None else f"{m.total_pss_bytes / mib:.0f}"
        rates = m.run_images_per_second or (m.images_per_second,)
        spread = f"{rates[0]:.1f}-{rates[-1]:.1f}" if len(rates) > 1 else "-"
        flag = "?" if m.caveats else " "
        mark = "*" if m.workers == planned_workers else " "
        lines.append(
            f" {mark} {m.workers:>7}  {m.start_method or '-':<6} {m.images_per_second:8.1f}{flag}"
            f" {spread:>15} {m.first_batch_seconds:14.2f} {workers_pss:>12} {total_pss:>10}"
        )
    if planned_workers is not None:
        lines.append(f"  * stoker's default for this budget (workers={planned_workers})")
    lines += [f"Note: {note}" for note in report.notes]
    caveats = [(m, c) for m in report.measurements for c in m.caveats]
    if caveats:
        lines.append("? Not reliable:")
        lines += [f"  {_plural(m.workers, 'worker')}: {c}" for m, c in caveats]
        if any(m.batches < steady_batches_needed(m.workers) for m, _ in caveats):
            lines.append("  (--batches sets the batches per run, --repeats the runs)")
    best = report.best()
    verdict = "" if report.reliable else " (not reliable, see above)"
    lines.append(
        f"Fastest: {_plural(best.workers, 'worker')} ({best.images_per_second:.1f} images/s)"
        f"{verdict}."
    )
    return lines


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    """``1 CPU``, ``2 CPUs``; ``plural`` for irregular nouns (``batch``/``batches``)."""
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


# --- tune ----------------------------------------------------------------------------------------


def _run_tune(args: argparse.Namespace) -> int:
    dataset = load_from_args(args)
    _say_load_warnings(args)
    result = stoker.tune_loader(
        dataset,
        request=stoker.LoaderRequest(workers="auto"),
        consumer_rate=args.consumer_rate,
        seed=dataset.seed,
        cache=not args.no_cache,
    )
    if args.json:
        print_json(result)
    else:
        print("\n".join(_render_tune(result, args.source)))
    return 1 if result.failure else 0


def _render_tune(result: Any, source: str) -> list[str]:
    budget, memory = result.plan.budget, result.memory
    gib = "unknown" if memory.usable_bytes is None else f"{memory.usable_bytes / 2**30:.1f} GiB"
    lines = [
        f"Measured {source} on a CPU budget of {_plural(budget.cpus, 'CPU')} ({budget.source}); "
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
    call = (
        "stoker.make_loader(dataset, workers='auto'"
        + (f", consumer_rate={result.consumer_rate:g}" if result.consumer_rate else "")
        + ")"
    )
    if result.cached or result.cache_path:
        lines.append(f"Use it: {call} reuses this choice")
    else:
        lines.append(
            f"Not remembered (--no-cache, or a dataset stoker cannot fingerprint): {call} "
            "measures again"
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
        "--no-cache",
        action="store_true",
        help="measure even if a choice is remembered, and do not remember this one",
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
    scan.add_argument("--latent-cache", default=None, metavar="DIR", help="report this cache")
    scan.add_argument("--text-cache", default=None, metavar="DIR", help="report this cache")
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
    from stoker.cli_cache import add_cache_parser

    add_cache_parser(sub, _add_source_options)
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
        "--batches",
        type=int,
        default=None,
        help="batches per run (default: enough that batches prefetched ahead cannot inflate the "
        "rate by more than a seventh: the warm-up plus 8x it, at least 20)",
    )
    bench.add_argument(
        "--repeats", type=int, default=3, help="runs per setting; the median is shown (default 3)"
    )
    bench.add_argument(
        "--start-method",
        choices=("fork", "spawn", "forkserver"),
        default=None,
        help="how worker processes start (default: the platform's)",
    )
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
        print(f"stoker: error: {_cli_words(str(err))}", file=sys.stderr)
        return 1 if isinstance(err, StokerError) else 2
    except OSError as err:  # the file system said no: say what and where, without a traceback
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"stoker: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
