"""The latent cache: plan which images need encoding, encode them per bucket, and serve latents.

Each entry holds the VAE's latent *distribution* (mean and log-variance) of one image as the dataset
loads it (its bucket, resize and centre crop), and of its mirror image when ``flip_aug`` is on, as
one ``(views, 2, C, h, w)`` tensor. Training draws a fresh sample ``mean + exp(logvar / 2) * noise``
each time, with noise keyed on ``(seed, epoch, position)`` like every other random choice, so no
single frozen sample is baked in (sd-scripts #1709) and a run is still bit-for-bit repeatable.

``random_crop``, ``color_aug``, ``face_crop_aug_range``, ``alpha_mask`` and ControlNet conditioning
images change the pixels from step to step or need the image itself, so they cannot be served from
a latent cache; asking for them raises a ``CacheError`` that says so (see docs/cache.md).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stoker.cache.index import MISSING, STALE, VALID, CacheIndex, CacheReport, hex_digests
from stoker.cache.keys import (
    FORMAT_VERSION,
    combine,
    content_digest,
    digest_strings,
    file_identity,
    model_digest,
)
from stoker.cache.shards import DTYPES, ShardReader, TensorSpec, read_header, write_shard
from stoker.errors import CacheError

__all__ = [
    "LatentCheck",
    "LatentPlan",
    "LatentReader",
    "cache_latents",
    "check_latent_cache",
    "open_latent_cache",
    "plan_latents",
]

KIND = "latents"
_DTYPE_NAMES = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "float32": "F32",
    "fp32": "F32",
}
_DTYPE_NAMES |= {name.lower(): name for name in ("BF16", "F16", "F32")}
# Flush a shard after this many entries, this many bytes or this many seconds, whichever first:
# a killed build loses at most that much work (an exception or Ctrl-C loses nothing).
_SHARD_ENTRIES = 1024
_SHARD_BYTES = 256 << 20
_FLUSH_SECONDS = 60.0


def storage_dtype(dtype: str) -> str:
    """The safetensors dtype name for a user's dtype (``bfloat16``/``bf16``, ``float16``, ...)."""
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"dtype={dtype!r} is not a cache dtype; use 'bfloat16' (default), 'float16' or 'float32'"
        ) from None


# --- what the dataset needs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LatentPlan:
    """The entries one dataset needs from a latent cache, one per image, with their digests.

    Attributes:
        paths: image paths (absolute), in dataset order.
        views: 2 where ``flip_aug`` is on (the mirror image is stored too), else 1.
        slot, recipe_slot, key: ``(N, 2)`` digests (see ``stoker.cache.keys``).
        sizes, mtimes: file size and ``st_mtime_ns`` when planned.
        encoder: the VAE digest the keys were made for; dtype: the storage dtype name.
    """

    paths: tuple[str, ...]
    views: np.ndarray
    slot: np.ndarray
    recipe_slot: np.ndarray
    key: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    encoder: str
    dtype: str


def refuse_augmentations(dataset: Any, what: str = "a latent cache") -> None:
    """Raise ``CacheError`` for subset settings that a latent cache cannot serve exactly."""
    reasons = {
        "random_crop": "crops at a new offset every step",
        "color_aug": "changes the colours every step",
        "face_crop_aug_range": "crops around the face at a new scale every step",
        "alpha_mask": "needs the alpha channel of the image at every step",
        "conditioning_data_dir": "needs the conditioning image at every step",
    }
    for subset in dataset.catalog.subsets:
        for key, why in reasons.items():
            if getattr(subset, key):
                raise CacheError(
                    f"{subset.where or 'a subset'}: {key} {why}, so {what} cannot give the "
                    f"pixels it would make. Turn {key} off for this subset to use {what} (flip_aug "
                    "is served from a cached mirror image), or train from images without a cache"
                )


def plan_latents(dataset: Any, *, encoder: str, dtype: str) -> LatentPlan:
    """The digests of every entry ``dataset`` needs for VAE ``encoder`` stored as ``dtype``."""
    refuse_augmentations(dataset)
    catalog = dataset.catalog
    paths = tuple(_absolute(catalog.paths[i]) for i in range(len(catalog)))
    flips = np.array([s.flip_aug for s in catalog.subsets], bool)[catalog.subset]
    views = np.where(flips, 2, 1).astype(np.int64)
    slot = digest_strings(f"{KIND}|{p}" for p in paths)
    recipe = _recipe_digests(dataset, views, encoder=encoder, dtype=dtype)
    recipe_slot = combine(slot, recipe)
    sizes, mtimes = file_identity(paths)
    return LatentPlan(
        paths=paths,
        views=views,
        slot=slot,
        recipe_slot=recipe_slot,
        key=combine(recipe_slot, sizes, mtimes),
        sizes=sizes,
        mtimes=mtimes,
        encoder=encoder,
        dtype=dtype,
    )


def _absolute(path: str) -> str:
    return path if path.startswith("/") else os.path.abspath(path)


def _recipe_digests(dataset: Any, views: np.ndarray, *, encoder: str, dtype: str) -> np.ndarray:
    """One digest per image of everything but the file, vectorised: the settings of its subset
    (hashed once per subset) folded with its bucket, resized size, centre crop and views."""
    catalog = dataset.catalog
    texts = []
    for s, subset in enumerate(catalog.subsets):
        owner = dataset.datasets[catalog.dataset_of_subset[s]]
        interpolation = subset.resize_interpolation or owner.resize_interpolation
        texts.append(
            f"{KIND}|format={FORMAT_VERSION}|vae={encoder}|dtype={dtype}|resize={interpolation}|"
            f"fast_decode={bool(dataset.fast_decode)}|crop=centre"
        )
    bucket = np.asarray(dataset.bucket_wh, np.int64)
    resized = np.asarray(dataset.resized_wh, np.int64)
    crop = (resized - bucket) // 2  # the centre crop of sd-scripts' trim (left, top)
    per_subset = digest_strings(texts)[np.asarray(catalog.subset, np.int64)]
    return combine(
        per_subset,
        bucket[:, 0],
        bucket[:, 1],
        resized[:, 0],
        resized[:, 1],
        crop[:, 0],
        crop[:, 1],
        views,
    )


# --- checking ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LatentCheck:
    """A dataset checked against a latent cache: the report, the plan, and per image its status
    (``VALID``/``STALE``/``MISSING``) and index row (``-1`` unless valid)."""

    report: CacheReport
    plan: LatentPlan
    status: np.ndarray
    rows: np.ndarray
    index: CacheIndex


def check_latent_cache(
    dataset: Any,
    cache_dir: str | os.PathLike[str],
    *,
    encoder: str | None = None,
    dtype: str | None = None,
) -> LatentCheck:
    """Classify every entry ``dataset`` needs against the cache in ``cache_dir``.

    ``encoder``/``dtype`` default to those of the cache's latest build. An image whose size or
    mtime changed but whose bytes did not (a copy, a ``touch``) is still valid: its entry gets the
    new key in the returned index (saved by the next build).
    """
    index = CacheIndex.load(cache_dir, KIND)
    encoder = encoder or index.info.get("encoder", "none")
    dtype = storage_dtype(dtype) if dtype else index.info.get("dtype", "BF16")
    plan = plan_latents(dataset, encoder=encoder, dtype=dtype)
    status, rows = index.classify(plan.key, plan.recipe_slot, plan.slot)
    _rescue_unchanged_content(index, plan, status, rows)
    report = _report(index, plan.paths, status, cache_dir)
    return LatentCheck(report=report, plan=plan, status=status, rows=rows, index=index)


def _rescue_unchanged_content(
    index: CacheIndex, plan: LatentPlan, status: np.ndarray, rows: np.ndarray
) -> None:
    """Stale by size/mtime only: compare file contents with the digest stored at build time."""
    stale = np.flatnonzero(status == STALE)
    if len(stale) == 0:
        return
    candidates = index.rows_of_recipe_slot(plan.recipe_slot[stale])
    same_rows, same_images = [], []
    for image, row in zip(stale.tolist(), candidates.tolist(), strict=True):
        if row >= 0 and np.array_equal(
            content_digest(plan.paths[image]), index.columns["content"][row]
        ):
            same_rows.append(row)
            same_images.append(image)
    if same_rows:
        index.add_aliases(np.array(same_rows), plan.key[same_images])
        status[same_images] = VALID
        rows[:] = index.find(plan.key)  # rows moved when the aliases were sorted in


def _report(
    index: CacheIndex,
    names: Sequence[str],
    status: np.ndarray,
    cache_dir: str | os.PathLike[str],
    encoded: int = 0,
) -> CacheReport:
    def examples(code: int) -> tuple[str, ...]:
        return tuple(names[i] for i in np.flatnonzero(status == code)[:5])

    return CacheReport(
        kind=index.kind,
        cache_dir=str(cache_dir),
        valid=int((status == VALID).sum()),
        stale=int((status == STALE).sum()),
        missing=int((status == MISSING).sum()),
        encoded=encoded,
        entries=len(index),
        shards=len(index.shard_names),
        stale_examples=examples(STALE),
        missing_examples=examples(MISSING),
    )


def cache_problem(report: CacheReport, fix: str) -> CacheError:
    """The ``CacheError`` for a cache that is not complete: counts, example files, the fix."""
    parts = [report.summary()]
    if report.stale:
        parts.append("stale (changed since they were cached): " + ", ".join(report.stale_examples))
    if report.missing:
        parts.append("missing: " + ", ".join(report.missing_examples))
    parts.append(f"fix: {fix} (it encodes only the stale and missing entries)")
    return CacheError("; ".join(parts))


# --- building ------------------------------------------------------------------------------------


def load_vae(vae: Any) -> Any:
    """A diffusers ``AutoencoderKL``: ``vae`` itself, or loaded from a local folder."""
    if isinstance(vae, (str, os.PathLike)):
        folder = Path(vae)
        if not folder.is_dir():
            raise CacheError(f"VAE folder {folder} does not exist; give a save_pretrained folder")
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise CacheError("loading a VAE needs diffusers: pip install 'stoker[cache]'") from err
        return AutoencoderKL.from_pretrained(folder)  # type: ignore[no-untyped-call]
    if not callable(getattr(vae, "encode", None)):
        raise ValueError(f"vae must be an AutoencoderKL or a folder, got {type(vae).__name__}")
    return vae


class _EncodeFeed(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Batches of bucket-sized pixels for the encoder, made in loader workers."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, images: Sequence[int]) -> dict[str, Any]:
        from stoker.data.images import ImageProblem

        kept, pixels, identity, problems = [], [], [], []
        for image in images:
            path = self.dataset.catalog.paths[int(image)]
            try:
                st = os.stat(path)
                digest = content_digest(path)
                pixels.append(self.dataset.view_pixels(int(image)))
            except (OSError, ImageProblem) as err:
                problems.append((path, str(getattr(err, "reason", err))))
                continue
            kept.append(int(image))
            identity.append((st.st_size, st.st_mtime_ns, int(digest[0]), int(digest[1])))
        stacked = np.stack(pixels).transpose(0, 3, 1, 2) if pixels else np.zeros((0, 3, 1, 1))
        return {
            "images": kept,
            "pixels": torch.from_numpy(np.ascontiguousarray(stacked, dtype=np.uint8)),
            "identity": identity,
            "problems": problems,
        }


def _passthrough(batch: Any) -> Any:
    return batch


class _ShardBuilder:
    """Collects encoded entries and writes them as shards; flushes by count, size and time."""

    def __init__(self, folder: Path, record_info: dict[str, Any], rank: int = 0) -> None:
        self.folder = folder
        self.rank = rank
        self.info = record_info
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.digests: dict[str, list[np.ndarray]] = {k: [] for k in _DIGEST_NAMES}
        self.nbytes = 0
        self.last_flush = time.monotonic()
        self.written = 0

    def add(self, tensor: torch.Tensor, digests: dict[str, np.ndarray]) -> None:
        self.tensors.append((f"{len(self.tensors)}.latent_dist", tensor))
        for name in _DIGEST_NAMES:
            self.digests[name].append(digests[name])
        self.nbytes += tensor.numel() * tensor.element_size()
        full = len(self.tensors) >= _SHARD_ENTRIES or self.nbytes >= _SHARD_BYTES
        if full or time.monotonic() - self.last_flush >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.tensors:
            entries = {k: hex_digests(np.stack(v)) for k, v in self.digests.items()}
            record = {"format": FORMAT_VERSION, "kind": KIND, "info": self.info, "entries": entries}
            name = f"{KIND}-r{self.rank}-{secrets.token_hex(8)}.safetensors"
            write_shard(self.folder / name, self.tensors, {"stoker": json.dumps(record)})
            self.written += len(self.tensors)
        self.tensors, self.nbytes = [], 0
        self.digests = {k: [] for k in _DIGEST_NAMES}
        self.last_flush = time.monotonic()


_DIGEST_NAMES = ("key", "recipe_slot", "slot", "content")


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None) of an initialised process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def encoder_batches(
    groups: np.ndarray, todo: np.ndarray, batch_size: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's share of ``todo``: whole per-bucket batches, dealt round-robin over ranks.

    Every rank computes the same list of batches (bucket by bucket, images in dataset order) and
    takes every ``world_size``-th one, so shares are disjoint, cover ``todo`` and do not depend on
    timing.
    """
    batches: list[list[int]] = []
    for group in np.unique(groups[todo]):
        members = todo[groups[todo] == group]
        batches += [
            members[i : i + batch_size].tolist() for i in range(0, len(members), batch_size)
        ]
    return batches[rank::world_size]


def cache_latents(
    dataset: Any,
    vae: Any,
    *,
    cache_dir: str | os.PathLike[str],
    dtype: str = "bfloat16",
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CacheReport:
    """Encode every image of ``dataset`` that has no valid entry in ``cache_dir``; return the state.

    Each image is encoded exactly as the dataset loads it (same bucket, resize and centre crop),
    and its mirror image too when ``flip_aug`` is on, in batches of one bucket fed by
    ``stoker.make_loader`` (decoding runs in loader workers sized by the CPU budget). The latent
    distribution (mean and log-variance) is stored as ``dtype`` (``"bfloat16"``, ``"float16"`` or
    ``"float32"``) in safetensors shards, each written atomically; an interrupted build keeps
    every shard it wrote and the next call encodes only what is still missing. Under an
    initialised ``torch.distributed`` group every rank calls this: each encodes a disjoint share
    and writes its own shards, and rank 0 writes the one index after a barrier.

    Args:
        dataset: a ``StokerDataset`` (``stoker.load_dataset``).
        vae: a diffusers ``AutoencoderKL`` or a local folder ``AutoencoderKL.from_pretrained`` reads.
        cache_dir: the cache folder (created if needed).
        device: where the VAE runs; default: where its weights are.
        batch_size: images per encoder call (the mirror images ride along); default 4.
        progress: ``progress(done, total)`` after each batch; default: a bar on a terminal.
        workers: loader workers for decoding; default: one per CPU of the budget (the main
            process mostly waits for the encoder on its device).

    Raises:
        CacheError: a setting the cache cannot serve (``random_crop``, ``color_aug``, ...).
    """
    from stoker.loader import make_loader
    from stoker.progress import progress_bar

    name = storage_dtype(dtype)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    refuse_augmentations(dataset)
    model = load_vae(vae)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world, dist = _distributed()
    check = check_latent_cache(dataset, folder, encoder=model_digest(model), dtype=name)
    plan, index = check.plan, check.index
    if dist is not None:
        dist.barrier()  # every rank planned from the same shards before any rank writes one
    todo = np.flatnonzero(check.status != VALID)
    batches = encoder_batches(dataset.groups, todo, batch_size or 4, rank, world)
    info = {"encoder": plan.encoder, "dtype": name}
    builder = _ShardBuilder(folder, info, rank)
    bar = progress or progress_bar(f"stoker: caching latents (rank {rank})", "images")
    try:
        _encode_all(dataset, model, plan, batches, builder, device, bar, workers, make_loader)
    finally:
        builder.flush()
    if dist is not None:
        dist.barrier()
    if rank == 0:
        index.reconcile()
        index.info = info
        index.save()
    if dist is not None:
        dist.barrier()
    final = check_latent_cache(dataset, folder, encoder=plan.encoder, dtype=name).report
    return _with_encoded(final, builder.written)


def _with_encoded(report: CacheReport, encoded: int) -> CacheReport:
    import dataclasses

    return dataclasses.replace(report, encoded=encoded)


def _encode_all(
    dataset: Any,
    model: Any,
    plan: LatentPlan,
    batches: list[list[int]],
    builder: _ShardBuilder,
    device: Any,
    progress: Callable[[int, int], None] | None,
    workers: int | None,
    make_loader: Callable[..., Any],
) -> None:
    total = sum(len(b) for b in batches)
    if total == 0:
        return
    if workers is None:
        from stoker.system.cpu import cpu_budget

        workers = cpu_budget().cpus
    loader = make_loader(
        _EncodeFeed(dataset.with_seed(dataset.seed)),
        batch_sampler=batches,
        collate_fn=_passthrough,
        workers=workers,
        # Decoding runs ahead of the encoder by several batches, so a run of large images
        # (one bucket's batches can be much slower to decode than the mean) does not stall it.
        prefetch_factor=4 if workers else None,
        seed=0,
        monitor=False,
    )
    target = torch.device(device) if device is not None else next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    store = DTYPES[plan.dtype]
    done = 0
    for batch in loader:
        for path, reason in batch["problems"]:
            _warn_skipped(path, reason)
        if batch["images"]:
            latents = _encode(
                model, batch["pixels"], plan.views[batch["images"][0]], target, model_dtype
            )
            for i, image in enumerate(batch["images"]):
                size, mtime, c_hi, c_lo = batch["identity"][i]
                key = combine(
                    plan.recipe_slot[image : image + 1], np.array([size]), np.array([mtime])
                )[0]
                builder.add(
                    latents[i].to(store).contiguous(),
                    {
                        "key": key,
                        "recipe_slot": plan.recipe_slot[image],
                        "slot": plan.slot[image],
                        "content": np.array([c_hi, c_lo], np.uint64),
                    },
                )
        done += len(batch["images"]) + len(batch["problems"])
        if progress is not None:
            progress(done, total)


@torch.no_grad()
def _encode(
    model: Any, pixels: torch.Tensor, views: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, views, 2, C, h, w)`` float32 on the CPU: mean and log-variance of each view."""
    x = pixels.to(device).to(torch.float32).div_(127.5).sub_(1.0)
    if views == 2:
        x = torch.cat([x, x.flip(-1)])  # one encoder call for both views: full batches
    dist = model.encode(x.to(dtype)).latent_dist
    stacked = torch.stack([dist.mean, dist.logvar], dim=1).float().cpu()  # (views*B, 2, C, h, w)
    count = pixels.shape[0]
    return stacked.reshape(views, count, *stacked.shape[1:]).transpose(0, 1).contiguous()


def _warn_skipped(path: str, reason: str) -> None:
    from stoker.warn import warn

    warn(
        f"stoker could not read {path} ({reason}) while caching latents; it has no cache entry. "
        "Fix or remove the file (stoker scan lists bad files)"
    )


# --- reading -------------------------------------------------------------------------------------


class LatentReader:
    """Per-image places of valid entries, and the sampling of latents from them.

    Picklable and small: a shard table and per-image arrays; shards are mapped lazily per process.
    """

    def __init__(self, folder: Path, index: CacheIndex, rows: np.ndarray) -> None:
        used = np.unique(index.columns["shard"][rows])
        self.shards = [
            ShardReader(folder / index.shard_names[s], index.shard_sizes[s]) for s in used
        ]
        remap = {int(s): i for i, s in enumerate(used)}
        specs: dict[int, dict[str, TensorSpec]] = {}
        for s in used.tolist():
            specs[s] = read_header(folder / index.shard_names[s])[0]
        n = len(rows)
        self.shard = np.zeros(n, np.int32)
        self.start = np.zeros(n, np.int64)
        self.shape = np.zeros((n, 5), np.int64)
        self.dtype = index.info.get("dtype", "BF16")
        for image, row in enumerate(rows.tolist()):
            s = int(index.columns["shard"][row])
            spec = specs[s][f"{int(index.columns['entry'][row])}.latent_dist"]
            self.shard[image] = remap[s]
            self.start[image] = spec.start
            self.shape[image] = spec.shape
            self.dtype = spec.dtype

    def distribution(self, image: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance ``(C, h, w)`` of ``image`` (its mirror view when ``flipped``)."""
        _, two, c, h, w = (int(v) for v in self.shape[image])
        out = self.read_into(image, flipped, torch.empty((two, c, h, w), dtype=DTYPES[self.dtype]))
        return out[0], out[1]

    def read_into(self, image: int, flipped: bool, out: torch.Tensor) -> torch.Tensor:
        """Read one view's ``(2, C, h, w)`` mean and log-variance into ``out`` (contiguous)."""
        views = int(self.shape[image, 0])
        # A view's mean and log-variance are contiguous: one read of just that view.
        offset = out.numel() * out.element_size() if flipped and views == 2 else 0
        return self.shards[int(self.shard[image])].read_into(int(self.start[image]) + offset, out)

    def sample(self, image: int, flipped: bool, noise_seed: int) -> torch.Tensor:
        """``mean + exp(logvar / 2) * noise`` as float32, noise from a generator seeded here."""
        mean, logvar = self.distribution(image, flipped)
        generator = torch.Generator().manual_seed(noise_seed)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        return torch.addcmul(mean.float(), logvar.float().mul_(0.5).exp_(), noise)


def open_latent_cache(
    dataset: Any, cache_dir: str | os.PathLike[str], *, vae: Any = None
) -> LatentReader:
    """The reader of a complete latent cache for ``dataset``; encodes what is missing if ``vae``.

    Raises:
        CacheError: entries are stale or missing and no ``vae`` was given (counts, example files
            and the command that fixes it), or a setting the cache cannot serve.
    """
    refuse_augmentations(dataset)
    if vae is not None:
        cache_latents(dataset, vae, cache_dir=cache_dir)
    check = check_latent_cache(dataset, cache_dir)
    if not check.report.ok:
        raise cache_problem(
            check.report,
            f"stoker cache <dataset> --vae <VAE folder> --cache-dir {cache_dir}, or "
            "stoker.cache_latents(dataset, vae, cache_dir=...)",
        )
    return LatentReader(Path(cache_dir), check.index, check.rows)
