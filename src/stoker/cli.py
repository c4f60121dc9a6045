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


def _workers_arg(text: str | None) -> int | str | None:
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
    print(f"\nLoading it with stoker.make_loader(workers={plan.num_workers}) ...")
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
    return parser


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
