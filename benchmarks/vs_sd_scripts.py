"""stoker against kohya-ss/sd-scripts' own data loader, side by side in one run.

    python benchmarks/vs_sd_scripts.py --sd-scripts /path/to/sd-scripts \\
        [--sd-scripts-deps DIR] [--images 40] [--epochs 3] [--rounds 3] [--batch-sizes 1,4]
    python benchmarks/vs_sd_scripts.py --sd-scripts DIR --quick   # smoke run: 12 images, 1 round

Without ``--sd-scripts``, or when sd-scripts' modules do not import, it says why and exits 0
(CI cannot fetch sd-scripts).

**sd-scripts' side is sd-scripts' own code**, imported from the checkout, used as its
``train_network.py`` uses it: its own argument parser (``train_network.setup_parser()``, so its
defaults: ``--max_data_loader_n_workers 8``, no persistent workers, no latent cache), its
``BlueprintGenerator``/``ConfigSanitizer`` on the dataset TOML, ``generate_dataset_group_by_blueprint``
(a ``DatasetGroup`` of ``DreamBoothDataset``), the SD tokenize and latents-caching strategies,
``collator_class`` with the shared epoch/step counters, and a ``torch.utils.data.DataLoader``
with ``batch_size=1, shuffle=True`` and ``num_workers = min(max_data_loader_n_workers,
os.cpu_count())``, as ``train_network.py`` computes it. Each epoch sets the shared epoch counter
before iterating, as its training loop does. Latents are not cached, so every image is decoded,
resized (OpenCV ``INTER_AREA`` / Pillow ``LANCZOS``), cropped and normalised by its
``IMAGE_TRANSFORMS`` (torchvision ``ToTensor`` + ``Normalize``). Not included: accelerate's
wrapper around the loader (``accelerator.prepare``), which adds no decoding work.

Three things are adapted so that sd-scripts imports here, none in its data path:

- **tokenizer**: no download is possible, so a CLIP tokenizer (``transformers.CLIPTokenizer``,
  ``model_max_length`` 77) is built from a byte-level vocabulary without merges in a temporary
  folder and handed to sd-scripts through its own ``--tokenizer_cache_dir``. Captions become one
  token per character instead of CLIP's words; the tokenizer runs once per caption (well under a
  millisecond) against tens of milliseconds per image.
- **torchvision**: when ``import torchvision`` fails (the PyPI wheel's compiled ops need CUDA
  libraries a CPU-only torch lacks), torchvision's own pure-Python ``transforms`` are loaded
  from its installed folder without running its package ``__init__`` (which registers the
  compiled ops). ``ToTensor`` and ``Normalize`` are torchvision's own code. Install the wheel
  that matches torch outside the environment with ``pip install --no-deps --target DIR
  torchvision==<match>`` and pass ``--sd-scripts-deps DIR``; the JSON says which way was taken.
- **transformers >= 5**: ``CLIPFeatureExtractor`` (imported, never used, by sd-scripts'
  long-prompt pipeline module) is given a placeholder name when transformers no longer has it.

**stoker's side**: ``stoker.load_dataset`` on the same TOML file, ``make_loader(dataset,
shuffle=True, seed=0)`` with no worker count (the default: tuned live), ``workers="auto"``, and
0, 1, 2 workers, each with float output (the default) and uint8 output. Every run has an empty
``STOKER_CACHE_DIR``, so nothing is remembered from an earlier run: what a new user gets.

The images are ``benchmarks/run.py``'s ``build_dataset`` set (``--images`` photo-like JPEGs and
PNGs of 0.3 to 12 megapixels, seed 0) in an sd-scripts folder ``1_photo/`` with ``.txt``
captions, trained at resolution 1024, buckets on with 256 to 2048 in steps of 64 (sd-scripts'
usual SDXL settings), one repeat, caption shuffling with one kept token, one TOML per batch size.

Each setting runs in a fresh subprocess (imports and dataset construction not timed): a loop
that only counts images over ``--epochs`` epochs, timed from creating the loader to the last
batch, so worker start-up (each epoch, for sd-scripts' non-persistent workers) is included.
Rounds are interleaved (every setting once per round, in turn), figures are medians of
``--rounds``. The same work: each child reports every file's bucket and resized size as its
dataset assigned them, and the run checks that all settings agree, that every run served
``epochs x images`` images and only shapes of those buckets. (The multiset of shapes sd-scripts
serves in one epoch varies from run to run: its collator reshuffles the bucket order when it
first sees the new epoch number, after the epoch's first batch was fetched, and in each worker
with that worker's seed, so some images come twice in an epoch and others not at all; the number
of images decoded is the same.)
Results: the terminal and ``benchmarks/out/vs_sd_scripts.json``.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SD_TOKENIZER_ID = "openai/clip-vit-large-patch14"  # the tokenizer sd-scripts asks for (SD 1.x)
STOKER_WORKERS: tuple[int | str | None, ...] = (None, "auto", 0, 1, 2)
SD_WORKERS: tuple[int | str, ...] = ("default", 0, 1, 2)
TARGET_11 = 2.0  # issue 11: stoker with 2 workers >= 2x sd-scripts with 2 workers
TARGET_13 = 1.3  # issue 13: stoker with no worker count >= 1.3x sd-scripts at its default

CONFIG = """[general]
enable_bucket = true
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = {batch_size}
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64

  [[datasets.subsets]]
  image_dir = "{image_dir}"
  num_repeats = 1
"""


# --- settings and their names (pure) -------------------------------------------------------------


def setting_label(setting: dict[str, Any]) -> str:
    """The row name of one setting, e.g. ``stoker, 2 workers, uint8``."""
    workers = setting["workers"]
    if setting["tool"] == "sd-scripts":
        count = "default workers" if workers == "default" else f"{workers} workers"
        return f"sd-scripts, {count}"
    if workers is None:
        count = "no worker count (default)"
    elif workers == "auto":
        count = 'workers="auto"'
    else:
        count = f"{workers} workers"
    return f"stoker, {count}, {setting['output']}"


def settings_for(batch_size: int) -> list[dict[str, Any]]:
    """Every setting of one batch size, in the order a round runs them."""
    out: list[dict[str, Any]] = []
    for sd_workers in SD_WORKERS:
        out.append({"tool": "sd-scripts", "workers": sd_workers, "batch_size": batch_size})
    for output in ("float", "uint8"):
        for workers in STOKER_WORKERS:
            if output == "uint8" and workers == "auto":
                continue  # auto and the default are the same rule; the default row covers uint8
            out.append(
                {"tool": "stoker", "workers": workers, "output": output, "batch_size": batch_size}
            )
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median images/s per setting label, with every run's figure and the workers used."""
    by_label: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        by_label[setting_label(run["setting"])].append(run)
    out: dict[str, dict[str, Any]] = {}
    for label, group in by_label.items():
        rates = [r["images"] / r["seconds"] for r in group]
        last = [r["epoch_images"][-1] / r["epoch_seconds"][-1] for r in group]
        out[label] = {
            "images_per_second": statistics.median(rates),
            "runs": rates,
            "last_epoch_images_per_second": statistics.median(last),
            "workers_used": sorted({str(r["workers_used"]) for r in group}),
        }
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets' ratios (stoker over sd-scripts), each with its target; missing rows skip."""
    wanted = [
        ("#11", "stoker, 2 workers, float", "sd-scripts, 2 workers", TARGET_11),
        ("#11", "stoker, 2 workers, uint8", "sd-scripts, 2 workers", TARGET_11),
        (
            "#13",
            "stoker, no worker count (default), float",
            "sd-scripts, default workers",
            TARGET_13,
        ),
        ("#13", 'stoker, workers="auto", float', "sd-scripts, default workers", TARGET_13),
        (
            "#13",
            "stoker, no worker count (default), uint8",
            "sd-scripts, default workers",
            TARGET_13,
        ),
    ]
    out = []
    for issue, ours, theirs, target in wanted:
        if ours in summary and theirs in summary:
            ratio = summary[ours]["images_per_second"] / summary[theirs]["images_per_second"]
            last = (
                summary[ours]["last_epoch_images_per_second"]
                / summary[theirs]["last_epoch_images_per_second"]
            )
            out.append(
                {
                    "issue": issue,
                    "stoker": ours,
                    "sd_scripts": theirs,
                    "ratio": ratio,
                    "ratio_last_epoch": last,
                    "target": target,
                    "met": ratio >= target,
                }
            )
    return out


def format_table(summary: dict[str, dict[str, Any]], found: list[dict[str, Any]]) -> list[str]:
    """Lines for the terminal: every setting's median images/s (whole run, last epoch), then the
    targets' ratios (on the whole run; the last epoch's in brackets)."""
    lines = [f"  {'setting':<44} {'images/s':>9} {'last epoch':>10}  {'workers used':<12} runs"]
    for label, row in summary.items():
        runs = " ".join(f"{r:.1f}" for r in row["runs"])
        used = ",".join(row["workers_used"])
        rate, last = row["images_per_second"], row["last_epoch_images_per_second"]
        lines.append(f"  {label:<44} {rate:9.1f} {last:10.1f}  {used:<12} {runs}")
    lines.append("")
    for r in found:
        verdict = "met" if r["met"] else "NOT met"
        lines.append(
            f"  {r['issue']}: {r['stoker']} / {r['sd_scripts']} = x{r['ratio']:.2f}"
            f" (last epoch x{r['ratio_last_epoch']:.2f})  target >= x{r['target']:.1f}: {verdict}"
        )
    return lines


def work_differences(
    assignments: dict[str, dict[str, list[int]]],
) -> dict[str, dict[str, list[str]]]:
    """Per setting, the files whose bucket or resized size differs from the first setting's.

    ``assignments`` maps a setting's label to ``{file name: [bucket w, bucket h, resized w,
    resized h]}``; settings that agree with the first one (and the first one) are left out.
    """
    if not assignments:
        return {}
    reference = next(iter(assignments.values()))
    out: dict[str, dict[str, list[str]]] = {}
    for label, files in assignments.items():
        names = sorted(set(reference) | set(files))
        missing = [n for n in names if n not in reference or n not in files]
        both = [n for n in names if n in reference and n in files]
        bucket = [n for n in both if files[n][:2] != reference[n][:2]]
        resized = [n for n in both if files[n][2:] != reference[n][2:]]
        if missing or bucket or resized:
            out[label] = {"missing": missing, "bucket": bucket, "resized": resized}
    return out


def served_problems(runs: list[dict[str, Any]], epochs: int) -> list[str]:
    """Runs that served a number of images other than ``epochs x`` the dataset's, or a shape
    (height x width) that is not one of the buckets their dataset assigned.

    sd-scripts' count is checked at batch size 1 only: its mid-epoch reshuffle (see the module's
    text) can swap a bucket's last, smaller batch for a full one, so with larger batches its
    epochs may serve a few images more or fewer; images/s counts the images it did serve.
    """
    problems = []
    for run in runs:
        assigned = run["assignments"]
        buckets = {f"{h}x{w}" for w, h, *_ in assigned.values()}
        label = setting_label(run["setting"])
        counted = run["setting"]["tool"] == "stoker" or run["setting"]["batch_size"] == 1
        if counted and run["images"] != epochs * len(assigned):
            problems.append(f"{label}: {run['images']} images, not {epochs} x {len(assigned)}")
        strange = sorted(set(run["shapes"]) - buckets)
        if strange:
            problems.append(f"{label}: served {', '.join(strange)}, not an assigned bucket")
    return problems


# --- sd-scripts in a child process ---------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2, CLIP) writes bytes as: printable Latin-1 bytes
    stand for themselves, the others are moved to code points from 256 on."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return [table[b] for b in range(256)]


def write_clip_tokenizer(cache_dir: Path) -> Path:
    """A tiny CLIP tokenizer (bytes and end-of-word bytes, no merges) where sd-scripts'
    ``--tokenizer_cache_dir`` looks for ``openai/clip-vit-large-patch14``."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in _byte_alphabet():
            vocab[char + suffix] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    raw = cache_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(raw / "vocab.json"),
        str(raw / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    target = cache_dir / SD_TOKENIZER_ID.replace("/", "_")
    tokenizer.save_pretrained(str(target))
    return target


def _torchvision_transforms_only() -> str:
    """Make ``from torchvision import transforms`` work; say how."""
    try:
        import torchvision.transforms  # noqa: F401
    except Exception as error:  # the compiled ops of a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("torchvision is not installed") from error
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        package.__spec__ = spec
        sys.modules["torchvision"] = package
        import torchvision.transforms  # noqa: F401  # its pure-Python transforms only

        version = _dist_version("torchvision")
        return (
            f"torchvision {version}: transforms only (import torchvision failed: "
            f"{type(error).__name__}: {str(error)[:120]})"
        )
    return f"torchvision {_dist_version('torchvision')}"


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def import_sd_scripts(sd_dir: Path, deps: Path | None) -> dict[str, Any]:
    """Import sd-scripts' modules from its checkout; returns them and how imports were adapted."""
    if deps is not None:
        sys.path.insert(0, str(deps))
    sys.path.insert(0, str(sd_dir))
    adapted = [_torchvision_transforms_only()]
    import transformers
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401  # settles the module

    module = sys.modules["transformers"]
    if "CLIPFeatureExtractor" not in dir(module):
        module.CLIPFeatureExtractor = type("CLIPFeatureExtractor", (), {})  # type: ignore[attr-defined]
        adapted.append(f"transformers {transformers.__version__}: CLIPFeatureExtractor placeholder")
    import train_network
    from library import config_util, strategy_base, train_util

    return {
        "train_network": train_network,
        "config_util": config_util,
        "strategy_base": strategy_base,
        "train_util": train_util,
        "adapted": adapted,
    }


def child_sd_scripts(spec: dict[str, Any]) -> dict[str, Any]:
    """One sd-scripts run: its loader as train_network.py builds it, a do-nothing loop."""
    import torch
    from accelerate.utils import set_seed

    sd = import_sd_scripts(Path(spec["sd_scripts"]), _path_or_none(spec.get("deps")))
    train_network, config_util = sd["train_network"], sd["config_util"]
    strategy_base, train_util = sd["strategy_base"], sd["train_util"]
    with tempfile.TemporaryDirectory() as tokenizers:
        write_clip_tokenizer(Path(tokenizers))
        argv = ["--dataset_config", spec["config"], "--tokenizer_cache_dir", tokenizers]
        argv += ["--seed", "0"]
        if spec["workers"] != "default":
            argv += ["--max_data_loader_n_workers", str(spec["workers"])]
        args = train_network.setup_parser().parse_args(argv)
        train_util.prepare_dataset_args(args, True)
        set_seed(args.seed)
        trainer = train_network.NetworkTrainer()
        strategy_base.TokenizeStrategy.set_strategy(trainer.get_tokenize_strategy(args))
        strategy_base.LatentsCachingStrategy.set_strategy(
            trainer.get_latents_caching_strategy(args)
        )
        blueprint = config_util.BlueprintGenerator(
            config_util.ConfigSanitizer(True, True, args.masked_loss, True)
        ).generate(config_util.load_user_config(args.dataset_config), args)
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    current_epoch, current_step = (
        torch.multiprocessing.Value("i", 0),
        torch.multiprocessing.Value("i", 0),
    )
    for_collator = group if args.max_data_loader_n_workers == 0 else None
    collator = train_util.collator_class(current_epoch, current_step, for_collator)
    group.set_current_strategies()
    n_workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)  # as train_network.py

    def make() -> Any:
        return torch.utils.data.DataLoader(
            group,
            batch_size=1,
            shuffle=True,
            collate_fn=collator,
            num_workers=n_workers,
            persistent_workers=args.persistent_data_loader_workers,
        )

    def set_epoch(epoch: int, step: int) -> None:
        current_epoch.value = epoch + 1
        current_step.value = step

    result = _timed_epochs(make, set_epoch, spec["epochs"], latents_key="latents")
    result.update(
        {
            "assignments": {
                Path(info.absolute_path).name: [*info.bucket_reso, *info.resized_size]
                for dataset in group.datasets
                for info in dataset.image_data.values()
            },
            "workers_used": n_workers,
            "max_data_loader_n_workers": args.max_data_loader_n_workers,
            "persistent_workers": args.persistent_data_loader_workers,
            "cache_latents": args.cache_latents,
            "adapted": sd["adapted"],
        }
    )
    return result


def child_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Import sd-scripts and read its parser's defaults (no dataset)."""
    sd = import_sd_scripts(Path(spec["sd_scripts"]), _path_or_none(spec.get("deps")))
    args = sd["train_network"].setup_parser().parse_args(["--dataset_config", "unused.toml"])
    return {
        "max_data_loader_n_workers": args.max_data_loader_n_workers,
        "persistent_data_loader_workers": args.persistent_data_loader_workers,
        "cache_latents": args.cache_latents,
        "adapted": sd["adapted"],
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
    }


# --- stoker in a child process -------------------------------------------------------------------


def child_stoker(spec: dict[str, Any]) -> dict[str, Any]:
    """One stoker run: make_loader with the setting's worker count, a do-nothing loop."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["STOKER_CACHE_DIR"] = cache  # nothing remembered from an earlier run
        import stoker
        from stoker.data.images import fast_jpeg_decoder

        dataset = stoker.load_dataset(
            spec["config"], on_error="raise", progress=lambda d, t: None, output=spec["output"]
        )
        kwargs: dict[str, Any] = {} if spec["workers"] is None else {"workers": spec["workers"]}
        loaders: list[Any] = []

        def make() -> Any:
            if not loaders:
                loaders.append(stoker.make_loader(dataset, shuffle=True, seed=0, **kwargs))
            return loaders[0]

        result = _timed_epochs(make, None, spec["epochs"], latents_key=None)
        loader = loaders[0]
        stats = loader.stats()
        result["assignments"] = {
            Path(path).name: [*map(int, dataset.bucket_wh[i]), *map(int, dataset.resized_wh[i])]
            for i, path in enumerate(dataset.catalog.paths)
        }
        result["workers_used"] = loader.num_workers
        result["decoder"] = fast_jpeg_decoder()
        result["switches"] = [
            f"epoch {s.epoch} batch {s.batch_in_epoch}: {s.from_workers} -> {s.to_workers}"
            for s in getattr(stats, "switches", ())
        ]
        result["persistent_workers"] = loader.persistent_workers
    return result


def _timed_epochs(
    make: Any, set_epoch: Any, epochs: int, latents_key: str | None
) -> dict[str, Any]:
    """Iterate ``epochs`` epochs with a loop that only counts; shapes of the first epoch."""
    shapes: collections.Counter[str] = collections.Counter()
    first: dict[str, Any] = {}
    images, epoch_seconds, epoch_images, step = 0, [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stoker's input-bound advice: a do-nothing loop waits
        began = time.perf_counter()
        loader = make()  # sd-scripts: one DataLoader, as train_network.py; stoker: make_loader
        for epoch in range(epochs):
            start = time.perf_counter()
            if set_epoch is not None:
                set_epoch(epoch, step)
            for batch in loader:
                pixels = batch["images"]
                images += int(pixels.shape[0])
                step += 1
                if set_epoch is not None:
                    set_epoch(epoch, step)
                if epoch == 0:
                    shapes[f"{pixels.shape[2]}x{pixels.shape[3]}"] += int(pixels.shape[0])
                    if not first:
                        first = {
                            "dtype": str(pixels.dtype),
                            "min": float(pixels.min()),
                            "max": float(pixels.max()),
                            "latents": None
                            if latents_key is None
                            else str(type(batch.get(latents_key)).__name__),
                        }
            epoch_seconds.append(time.perf_counter() - start)
            epoch_images.append(images - sum(epoch_images))
        seconds = time.perf_counter() - began
    return {
        "images": images,
        "seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "epoch_images": epoch_images,
        "shapes": dict(sorted(shapes.items())),
        "first_batch": first,
    }


def _path_or_none(value: str | None) -> Path | None:
    return None if value is None else Path(value)


# --- the parent ----------------------------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one setting in a fresh interpreter; its result, or an error with its output's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        cmd += ["--result", str(result_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not result_path.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            return {"error": f"exit status {done.returncode}", "output_tail": tail}
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
        return result


def prepare_images(images: int) -> Path:
    """benchmarks/run.py's image set, in an sd-scripts folder ``1_photo/``; returns the root."""
    spec = importlib.util.spec_from_file_location("stoker_benchmarks_run", HERE / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)  # benchmarks/run.py, without putting benchmarks/ on sys.path
    root = OUT / f"vs-sd-scripts-{images}"
    run.build_dataset(root, images=images)
    source, folder = root / "2_photo", root / "1_photo"
    if not folder.exists():  # one repeat: the folder's name says so to sd-scripts' DreamBooth rule
        folder.mkdir()
        for path in sorted(source.iterdir()):
            os.link(path, folder / path.name)
    return root


def write_config(root: Path, batch_size: int) -> Path:
    config = root / f"vs-sd-scripts-batch{batch_size}.toml"
    config.write_text(
        CONFIG.format(batch_size=batch_size, image_dir=(root / "1_photo").as_posix()),
        encoding="utf-8",
    )
    return config


def report(
    runs: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    batch_size: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Print one batch size's table, ratios and same-work checks; return them for the JSON."""
    summary = summarize(runs)
    found = ratios(summary)
    _say(f"\nBatch size {batch_size}, median images/s over {args.rounds} rounds:")
    for line in format_table(summary, found):
        _say(line)
    assignments = {setting_label(r["setting"]): r["assignments"] for r in runs}
    differences = work_differences(assignments)
    _say(
        f"  same work: {len(next(iter(assignments.values()), {}))} images; every setting "
        "assigns each the same bucket and resized size: "
        + ("yes" if not differences else f"NO: {json.dumps(differences)}")
    )
    served = served_problems(runs, args.epochs)
    _say("  served: " + ("as assigned" if not served else "; ".join(served)))
    return {
        "summary": summary,
        "ratios": found,
        "same_work": not differences and not served,
        "served_problems": served,
        "work_differences": differences,
        "assignments": next(iter(assignments.values()), {}),
        "first_batch": {setting_label(r["setting"]): r["first_batch"] for r in runs},
        "runs": runs,
        "failures": failures,
    }


def versions(sd_dir: Path) -> dict[str, str | None]:
    """Python, torch and stoker versions, and sd-scripts' commit when its checkout is a git one."""
    import torch

    import stoker

    done = subprocess.run(
        ["git", "-C", str(sd_dir), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "stoker": getattr(stoker, "__version__", None),
        "sd_scripts_commit": done.stdout.strip() or None if done.returncode == 0 else None,
    }


def _say(text: str = "") -> None:
    print(text, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scripts", type=Path, help="a checkout of kohya-ss/sd-scripts")
    parser.add_argument(
        "--sd-scripts-deps",
        type=Path,
        help="a pip --target folder put first on sd-scripts' sys.path (e.g. torchvision)",
    )
    parser.add_argument("--images", type=int, help="images in the set (40; --quick 12)")
    parser.add_argument("--epochs", type=int, help="epochs per run (3; --quick 1)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; --quick 1)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (about 3 minutes): not figures"
    )
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (1)")
    parser.add_argument("--out", type=Path, default=OUT / "vs_sd_scripts.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"images": 12, "epochs": 1, "rounds": 1} if args.quick else {}
    for name, value in {"images": 40, "epochs": 3, "rounds": 3, **defaults}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        run = {"probe": child_probe, "sd-scripts": child_sd_scripts, "stoker": child_stoker}
        result = run[spec["tool"]](spec)
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0
    if args.sd_scripts is None:
        _say(
            "vs_sd_scripts: skipped: no --sd-scripts DIR given (a checkout of kohya-ss/sd-scripts)."
        )
        return 0
    if not (args.sd_scripts / "library" / "train_util.py").is_file():
        _say(
            f"vs_sd_scripts: skipped: {args.sd_scripts} is not a checkout of kohya-ss/sd-scripts "
            "(no library/train_util.py)."
        )
        return 0
    deps = None if args.sd_scripts_deps is None else str(args.sd_scripts_deps.resolve())
    base = {"sd_scripts": str(args.sd_scripts.resolve()), "deps": deps}
    probe = run_child({"tool": "probe", **base})
    if "error" in probe:
        _say(f"vs_sd_scripts: skipped: sd-scripts from {args.sd_scripts} does not import here:")
        _say("\n".join(probe["output_tail"].strip().splitlines()[-6:]))
        _say(
            "  Its dataset modules need, beyond torch: transformers, diffusers, accelerate, "
            "opencv, and `pip install 'stoker[bench]'` (toml, voluptuous, imagesize, einops); "
            "and torchvision's transforms: `pip install --no-deps --target DIR torchvision==V` "
            "(V: the release built for this torch), then pass --sd-scripts-deps DIR."
        )
        return 0
    return compare(args, base, probe)


def compare(args: argparse.Namespace, base: dict[str, Any], probe: dict[str, Any]) -> int:
    from stoker import cpu_budget

    default_sd = min(probe["max_data_loader_n_workers"], probe["os_cpu_count"])
    root = prepare_images(args.images)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    _say(
        f"stoker vs sd-scripts ({base['sd_scripts']}): {args.images} images, resolution 1024, "
        f"{args.epochs} epochs a run, {args.rounds} rounds, batch sizes {batch_sizes}"
    )
    _say(
        f"  sd-scripts default: max_data_loader_n_workers={probe['max_data_loader_n_workers']}, "
        f"os.cpu_count()={probe['os_cpu_count']} -> {default_sd} workers, persistent="
        f"{probe['persistent_data_loader_workers']}; this process may use "
        f"{probe['affinity_cpus']} CPUs; stoker's CPU budget: {cpu_budget().cpus}"
    )
    _say(f"  sd-scripts imports adapted: {'; '.join(probe['adapted'])}")
    results: dict[str, Any] = {"probe": probe, "by_batch_size": {}}
    started = time.perf_counter()
    for batch_size in batch_sizes:
        config = write_config(root, batch_size)
        settings = settings_for(batch_size)
        runs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            for setting in settings:
                spec = {**base, **setting, "config": str(config), "epochs": args.epochs}
                result = run_child(spec)
                if "error" in result:
                    failures.append({"setting": setting, **result})
                    _say(f"  FAILED {setting_label(setting)}: {result['error']}")
                    _say(result["output_tail"][-1500:])
                    continue
                runs.append({"setting": setting, **result})
            elapsed = time.perf_counter() - started
            done = batch_sizes.index(batch_size) * args.rounds + round_ + 1
            left = elapsed / done * (len(batch_sizes) * args.rounds - done)
            _say(
                f"  batch {batch_size}: round {round_ + 1}/{args.rounds} done "
                f"({elapsed:.0f} s so far, about {left:.0f} s to go)"
            )
        results["by_batch_size"][str(batch_size)] = report(runs, failures, batch_size, args)
    results["sd_scripts_default_workers"] = default_sd
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    results["seconds"] = time.perf_counter() - started
    results["versions"] = versions(Path(base["sd_scripts"]))
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from stoker.files import atomic_write_text

    atomic_write_text(args.out, json.dumps(results, indent=1))
    _say(f"\nload average after: {' '.join(results['loadavg_after'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
