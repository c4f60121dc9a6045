"""The latent cache, side by side with what it replaces: one command, ratios in one run.

    python benchmarks/cache.py            # about 3 minutes on 2 CPUs
    python benchmarks/cache.py --quick    # under a minute: a smoke test, not figures

1. An epoch from the cache against an epoch from the images of the same dataset (benchmarks/run.py's
   photo-like JPEG/PNG set at resolution 1024, 2 repeats, batch 4), with the loader's default
   workers for this CPU budget. Target: >= 20x the samples/s.
2. The read path at SDXL latent size (4x128x128, bf16), files in the page cache, one thread: an
   entry's mean and log-variance out of a shard into a batch, and the same plus the keyed sample
   (``latents`` as the dataset returns them), against sd-scripts' format (one float32 ``.npz`` per
   image, ``np.load(...)["latents"]``). Targets: >= 5,000 samples/s per core, >= 4x npz.
3. Checking a 100,000-image dataset against its cache (stat every file, key every image, one
   sorted search against the index). Target: < 1 s.
4. Building the cache with a stand-in encoder of known cost (sleeps ``--encoder-ms`` per image,
   as a GPU would, leaving the CPUs to the decoding workers), against the slower of the
   encoder-bound rate (images over the time spent inside the encoder) and the decode capacity
   (the build rate with a free encoder): decoding overlaps encoding, so the build runs at
   >= 0.9x that bound (target). Where the encoder is faster than the CPUs can decode (a fast
   GPU on 2 CPUs), the decode capacity is the bound, and the figure says so.

Figures are noisy when other work shares the CPUs; run it on a quiet machine for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import stoker
from stoker.cache.index import CacheIndex
from stoker.cache.latents import LatentReader, check_latent_cache, plan_latents
from stoker.cache.shards import write_shard
from stoker.data.catalog import StringTable
from stoker.data.config import DatasetConfig, SubsetConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import OUT, build_dataset  # noqa: E402  (the shared benchmark dataset)


class StandInVae(torch.nn.Module):
    """Makes latents of the right shape (8x smaller, 4 channels) and takes ``seconds`` per image."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.proj = torch.nn.Conv2d(3, 4, 1)
        self.busy_seconds = 0.0  # time inside encode(): the encoder-bound time of a build

    def encode(self, x: torch.Tensor) -> Any:
        start = time.perf_counter()
        time.sleep(self.seconds * x.shape[0])
        mean = self.proj(torch.nn.functional.avg_pool2d(x, 8))
        out = SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, logvar=mean * 0 - 2))
        self.busy_seconds += time.perf_counter() - start
        return out


def _quiet(done: int, total: int) -> None:
    return None


def _epoch_rate(dataset: Any) -> float:
    loader = stoker.make_loader(dataset, shuffle=True, seed=0, monitor=False)
    count = 0
    for batch in loader:  # warm-up epoch: workers started, pages cached
        count += len(batch["captions"])
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["captions"])
    return count / (time.perf_counter() - start)


def _build(config: Path, cache: Path, encoder_ms: float) -> tuple[float, float]:
    """(build images/s, encoder-bound images/s: images over the time spent inside the encoder)."""
    dataset = stoker.load_dataset(config, progress=_quiet)
    vae = StandInVae(encoder_ms / 1000)
    start = time.perf_counter()
    report = stoker.cache_latents(dataset, vae, cache_dir=cache, progress=_quiet)
    seconds = time.perf_counter() - start
    return report.encoded / seconds, report.encoded / vae.busy_seconds


def section_build(config: Path, work: Path, encoder_ms: list[float]) -> dict[str, Any]:
    """Build rates: with a free encoder (the decode capacity) and with encoders of known cost."""
    decode, _ = _build(config, work / "build-free", 0.0)
    rows = []
    for ms in encoder_ms:
        rate, encoder_bound = _build(config, work / f"build-{ms:g}", ms)
        bound = min(encoder_bound, decode)
        rows.append(
            {
                "encoder_ms": ms,
                "encoder_per_s": encoder_bound,
                "build_per_s": rate,
                "bound_per_s": bound,
                "ratio": rate / bound,
            }
        )
    return {"decode_per_s": decode, "rows": rows}


def section_epoch(config: Path, cache: Path) -> dict[str, Any]:
    images = stoker.load_dataset(config, progress=_quiet)
    stoker.cache_latents(images, StandInVae(0.0), cache_dir=cache, progress=_quiet)
    cached = stoker.load_dataset(config, progress=_quiet, latent_cache=cache)
    from_images = _epoch_rate(images)
    from_cache = _epoch_rate(cached)
    return {
        "images": len(images),
        "epoch_images_per_s": from_images,
        "epoch_cache_per_s": from_cache,
        "epoch_ratio": from_cache / from_images,
    }


def section_read(folder: Path, entries: int, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    shape = (1, 2, 4, 128, 128)
    rng = np.random.default_rng(0)
    shard_size = 256
    for first in range(0, entries, shard_size):
        tensors = [
            (
                f"{i}.latent_dist",
                torch.from_numpy(rng.standard_normal(shape, np.float32)).bfloat16(),
            )
            for i in range(min(shard_size, entries - first))
        ]
        write_shard(folder / f"read-{first:06d}.safetensors", tensors, {})
    npz = folder / "npz"
    npz.mkdir()
    for i in range(entries):
        latent = rng.standard_normal((4, 128, 128), np.float32)
        np.savez(npz / f"{i:06d}.npz", latents=latent, original_size=np.array([1024, 1024]))
    reader = _reader(folder, entries, shard_size, shape)

    # Batches of 4 into reused buffers, as a loader's steady state reuses freed memory.
    dist_batch = torch.empty((4, 2, 4, 128, 128), dtype=torch.bfloat16)
    latent_batch = torch.empty((4, 4, 128, 128))

    def read_cache() -> None:
        for i in range(entries):
            reader.read_into(i, False, dist_batch[i % 4])

    def read_sampled() -> None:
        for i in range(entries):
            latent_batch[i % 4] = reader.sample(i, False, i)

    def read_npz() -> None:
        for i in range(entries):
            with np.load(npz / f"{i:06d}.npz") as data:
                latent_batch[i % 4] = torch.from_numpy(data["latents"])

    rates = {}
    for name, fn in (("cache", read_cache), ("cache_sampled", read_sampled), ("npz", read_npz)):
        fn()  # into the page cache
        best = min(_cpu_seconds(fn) for _ in range(rounds))
        rates[name] = entries / best
    rates["ratio_vs_npz"] = rates["cache"] / rates["npz"]
    rates["sampled_ratio_vs_npz"] = rates["cache_sampled"] / rates["npz"]
    return rates


def _cpu_seconds(fn: Any) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def _reader(folder: Path, entries: int, shard_size: int, shape: tuple[int, ...]) -> LatentReader:
    """A reader over the synthetic shards (the same class the dataset uses)."""
    index = CacheIndex(folder, "read")
    names = sorted(p.name for p in folder.glob("read-*.safetensors"))
    index.shard_names = names
    index.shard_sizes = [(folder / n).stat().st_size for n in names]
    index.columns["shard"] = (np.arange(entries) // shard_size).astype(np.int32)
    index.columns["entry"] = (np.arange(entries) % shard_size).astype(np.int32)
    index.info = {"dtype": "BF16"}
    return LatentReader(folder, index, np.arange(entries))


def section_validate(folder: Path, entries: int, rounds: int) -> dict[str, Any]:
    """A 100k-image dataset (zero-byte stand-ins: only their stat matters) and a full index."""
    files = folder / "images"
    files.mkdir()
    paths = [str(files / f"{i:06d}.jpg") for i in range(entries)]
    for path in paths:
        open(path, "wb").close()
    subset = SubsetConfig(kind="dreambooth", image_dir=files, flip_aug=True)
    dataset = SimpleNamespace(
        catalog=SimpleNamespace(
            paths=StringTable.from_strings(paths),
            subset=np.zeros(entries, np.int32),
            subsets=(subset,),
            dataset_of_subset=(0,),
            __len__=lambda: entries,
        ),
        datasets=(DatasetConfig(subsets=(subset,), resolution=(1024, 1024)),),
        bucket_wh=np.tile([1024, 1024], (entries, 1)),
        resized_wh=np.tile([1024, 1024], (entries, 1)),
        fast_decode=True,
    )
    dataset.catalog = _Sized(dataset.catalog, entries)
    plan = plan_latents(dataset, encoder="bench", dtype="BF16")
    index = CacheIndex(folder, "latents")
    index.columns = {
        "key": plan.key,
        "recipe_slot": plan.recipe_slot,
        "slot": plan.slot,
        "content": np.zeros_like(plan.key),
        "shard": np.zeros(entries, np.int32),
        "entry": np.arange(entries, dtype=np.int32),
    }
    index.shard_names, index.shard_sizes = [], []
    index.info = {"encoder": "bench", "dtype": "BF16"}
    index._sort()
    index.save()
    os.utime(paths[7], ns=(1, 2))  # one changed file: it must be found
    seconds, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        check = check_latent_cache(dataset, folder)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    report = check.report
    return {
        "entries": entries,
        "seconds": min(seconds),
        "cpu_seconds": min(cpu),
        "valid": report.valid,
        "stale": report.stale,
        "missing": report.missing,
    }


class _Sized:
    """A catalog stand-in with len()."""

    def __init__(self, inner: Any, n: int) -> None:
        self.__dict__.update(inner.__dict__)
        self._n = n

    def __len__(self) -> int:
        return self._n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None, help="dataset images (36; quick 12)")
    parser.add_argument(
        "--encoder-ms",
        type=float,
        nargs="+",
        default=[80.0, 800.0],
        help="stand-in encoder costs, ms per image",
    )
    args = parser.parse_args(argv)
    images = args.images or (12 if args.quick else 36)
    config = build_dataset(OUT / "dataset", images=images)
    work = Path(tempfile.mkdtemp(prefix="stoker-cache-bench-"))
    try:
        results = {
            "epoch": section_epoch(config, work / "cache"),
            "build": section_build(config, work, args.encoder_ms),
            "read": section_read(_mk(work / "read"), 500 if args.quick else 2000, 3),
            "validate": section_validate(_mk(work / "validate"), 100_000, 3),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(results)
    OUT.mkdir(exist_ok=True)
    (OUT / "cache.json").write_text(json.dumps(results, indent=2))
    return 0


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _print(r: dict[str, Any]) -> None:
    e, rd, v, b = r["epoch"], r["read"], r["validate"], r["build"]
    print(f"budget: {stoker.cpu_budget().cpus} CPUs")
    print(f"1. epoch ({e['images']} images, 1024 buckets, default workers):")
    print(f"   from images {e['epoch_images_per_s']:8.1f} samples/s")
    print(
        f"   from cache  {e['epoch_cache_per_s']:8.1f} samples/s   {e['epoch_ratio']:.1f}x "
        "(target >= 20x)"
    )
    print("2. read path, 4x128x128, one thread, page cache:")
    print(
        f"   cache (mean+logvar, bf16)   {rd['cache']:8.0f} samples/s  "
        f"{rd['ratio_vs_npz']:.1f}x npz (targets >= 5000/s, >= 4x)"
    )
    print(
        f"   cache + keyed sample (f32)  {rd['cache_sampled']:8.0f} samples/s  "
        f"{rd['sampled_ratio_vs_npz']:.1f}x npz"
    )
    print(f"   npz (float32, one file each){rd['npz']:8.0f} samples/s")
    print(
        f"3. check {v['entries']} images against the index: {v['seconds']:.3f} s wall, "
        f"{v['cpu_seconds']:.3f} s CPU ({v['valid']} valid, {v['stale']} stale, "
        f"{v['missing']} missing; target < 1 s)"
    )
    print(f"4. build; decode capacity (free encoder): {b['decode_per_s']:.2f} images/s")
    for row in b["rows"]:
        print(
            f"   encoder {row['encoder_ms']:g} ms/image ({row['encoder_per_s']:.2f}/s): "
            f"{row['build_per_s']:.2f} images/s = {row['ratio']:.2f}x min(encoder, decode) "
            "(target >= 0.9x)"
        )


if __name__ == "__main__":
    sys.exit(main())
