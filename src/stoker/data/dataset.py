"""sd-scripts datasets as torch datasets: load, bucket, batch, and turn keys into training batches.

``load_dataset(source)`` reads a dataset config, a ``train_data_dir`` or fine-tuning metadata,
scans it once, assigns buckets, and returns a ``StokerDataset``. The dataset is map-style: its
batch sampler yields keys ``(epoch, position, image, step)``, and ``__getitems__`` turns a batch of
keys into a batch dict with sd-scripts' keys. Every random choice for a sample comes from
generators keyed on ``(seed, epoch, position)``, so the batch does not depend on which worker made
it, how many workers there are, or how they were started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stoker import torch_internals
from stoker.data.buckets import BucketReport, assign_buckets, bucket_report
from stoker.data.buffers import (
    FLOAT_BLOCKS,
    ArrivedBlocks,
    BatchBuffers,
    SharedBlocks,
    reused_shared_blocks,
)
from stoker.data.captions import process_caption
from stoker.data.catalog import Catalog, Problem, scan_dataset, stderr_progress
from stoker.data.config import (
    DatasetConfig,
    DatasetGroupConfig,
    SubsetConfig,
    config_from_metadata,
    config_from_train_data_dir,
    parse_dataset_config,
)
from stoker.data.images import (
    ImageProblem,
    alpha_to_mask,
    color_aug,
    conditioning_crop_top_left,
    decode_scaled,
    face_crop,
    open_image,
    parse_face_info,
    resize_crop,
)
from stoker.data.sampler import BucketBatchSampler, balance_reg_repeats
from stoker.errors import ConfigError, DatasetError
from stoker.rng import Stream, keyed_rng
from stoker.warn import warn

__all__ = ["DatasetReport", "StokerDataset", "load_dataset", "passthrough_collate"]

OnError = Literal["raise", "skip", "warn"]
Output = Literal["float", "uint8"]
# How many other images of the same bucket to try before giving up on a batch slot.
_REPLACEMENT_TRIES = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SubsetSummary:
    """Counts for one subset: what ``stoker scan`` shows per line."""

    where: str
    folder: str
    is_reg: bool
    num_repeats: int
    images: int
    samples_per_epoch: int
    missing_captions: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetReport:
    """What a dataset holds and what was wrong with its input.

    Attributes:
        images: usable images.
        samples_per_epoch: images counted with their repeats (and regularisation balancing).
        batches_per_epoch: batches per epoch on one rank.
        subsets: per-subset counts.
        problems: every file skipped or worked around, with the reason.
        buckets: the bucket table (per dataset, in dataset order).
        notes: other things worth knowing (regularisation balancing, skipped folders).
    """

    images: int
    samples_per_epoch: int
    batches_per_epoch: int
    subsets: tuple[SubsetSummary, ...]
    problems: tuple[Problem, ...]
    buckets: tuple[BucketReport, ...]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        """The report as ``stoker scan`` prints it: one line per subset, note, bucket, problem."""
        lines = [
            f"{_counted(self.images, 'image')}, {_counted(self.samples_per_epoch, 'sample')} per "
            f"epoch (with repeats), {_counted(self.batches_per_epoch, 'batch', 'batches')} per "
            "epoch",
            "Subsets:",
        ]
        train = sum(s.samples_per_epoch for s in self.subsets if not s.is_reg)
        for sub in self.subsets:
            kind = "reg  " if sub.is_reg else "train"
            line = (
                f"  {kind} {sub.images:>6} {'image ' if sub.images == 1 else 'images'} "
                f"x{sub.num_repeats:<3} -> {sub.samples_per_epoch:>7} samples  {sub.folder}"
            )
            if sub.missing_captions:
                line += f"  ({sub.missing_captions} without caption)"
            if sub.is_reg and sub.samples_per_epoch != sub.images * sub.num_repeats:
                line += (
                    f"  (balanced: as sd-scripts does, regularisation images are repeated to "
                    f"match the {train} training samples, not x{sub.num_repeats})"
                )
            lines.append(line)
        lines += [f"Note: {note}" for note in self.notes]
        for d, buckets in enumerate(self.buckets):
            lines.append(
                f"Buckets of dataset {d + 1} (mean aspect error {buckets.mean_ar_error:.4f}):"
            )
            lines += [
                f"  {b.width:>5} x {b.height:<5} {b.count:>7} {'image ' if b.count == 1 else 'images'}"
                f"  aspect error {b.mean_ar_error:+.4f}"
                for b in buckets.buckets
            ]
        if self.problems:
            lines.append(f"Problems ({len(self.problems)}):")
            lines += [f"  {p.path}: {p.reason} [{p.action}]" for p in self.problems]
        return lines


def _spelling_free(value: Any) -> Any:
    """Config records without their ``where`` (the source path as the caller spelled it), so
    ``ds/x.toml`` and ``/abs/ds/x.toml`` share one fingerprint; image paths are already absolute."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__qualname__,
            tuple(
                (f.name, _spelling_free(getattr(value, f.name)))
                for f in dataclasses.fields(value)
                if f.name != "where"
            ),
        )
    if isinstance(value, (tuple, list)):
        return tuple(_spelling_free(v) for v in value)
    return value


def _counted(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def passthrough_collate(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


class StokerDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Images of one or more sd-scripts datasets with their buckets, repeats and caption rules.

    Build it with `load_dataset`. ``len(dataset)`` is the number of usable images;
    ``dataset.report`` says what was found and skipped. Pass it to ``stoker.make_loader``, which
    uses ``make_batch_sampler`` and ``collate_fn`` on its own.
    """

    collate_fn = staticmethod(passthrough_collate)
    # How float batches cross from workers (`for_workers`): "uint8", a quarter of the bytes, in
    # each worker's reused shared-memory blocks, converted in the main process; "blocks", as
    # float, written once in the worker into its reused blocks that the loop receives as they are
    # (x86-64; elsewhere "uint8"). "blocks" frees the main process (1.3 against 3.6 ms an image)
    # but ran slower on the quiet 2-CPU machine (x0.78 against x0.86 of 2x one process, both with
    # "least work"): measured in issue #11 (docs/performance.md, 2a).
    float_transit: Literal["blocks", "uint8"] = "uint8"
    # Which worker makes each batch: "least work" (the worker with the fewest source pixels
    # outstanding, by `batch_cost`; the same batches in the same order) or "in turn" (torch's
    # own: batch k to worker k mod n, so one worker waits while the other makes a costly one).
    # Measured in issue #11 (docs/performance.md, 2a).
    dispatch: Literal["in turn", "least work"] = "least work"

    def __init__(
        self,
        *,
        catalog: Catalog,
        datasets: Sequence[DatasetConfig],
        bucket_wh: np.ndarray,
        resized_wh: np.ndarray,
        groups: np.ndarray,
        repeats: np.ndarray,
        batch_sizes: np.ndarray,
        report: DatasetReport,
        seed: int = 0,
        max_train_steps: int | None = None,
        output: Output = "float",
        fast_decode: bool = True,
        on_error: OnError = "warn",
    ) -> None:
        self.catalog = catalog
        self.datasets = tuple(datasets)
        self.bucket_wh = bucket_wh
        self.resized_wh = resized_wh
        self.groups = groups
        self.repeats = repeats
        self.batch_sizes = batch_sizes
        self.report = report
        self.on_error = on_error
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.output = output
        self.fast_decode = fast_decode
        self.caption_rules = tuple(s.caption_rules() for s in catalog.subsets)
        self.has_alpha = any(s.alpha_mask for s in catalog.subsets)
        self.has_conditioning = any(s.conditioning_data_dir is not None for s in catalog.subsets)
        self.decode_problems: list[Problem] = []  # filled in the main process by the loader
        # Set on the twin that worker processes run (`for_workers`): float batches cross the
        # worker queue as uint8, a quarter of the bytes, and `arrive` converts them.
        self.uint8_in_transit = False
        # Set on that twin instead where float batches travel as float in reused blocks that
        # `arrive` lends to the training loop as they are (`for_workers`).
        self.float_in_blocks = False
        self.small_in_transit = False  # small tensors travel as arrays (`for_workers`)
        # Reused memory for the batches this process builds (stoker.data.buffers); twins share it.
        self.buffers = BatchBuffers()
        # A worker's reused shared-memory blocks for uint8 batches that `arrive` converts and
        # gives back (the main process's side: `arrived`).
        self.shared_blocks = SharedBlocks()
        self.arrived = ArrivedBlocks()
        # Set by load_dataset(latent_cache=..., text_cache=...): readers of stoker.cache.
        self.latents: Any = None
        self.text: Any = None
        self._catalog_id: str | None = None

    @property
    def report(self) -> DatasetReport:
        """What the scan found, with the decode-time problems the loader has met so far."""
        if not self.decode_problems:
            return self._report
        return dataclasses.replace(
            self._report, problems=self._report.problems + tuple(self.decode_problems)
        )

    @report.setter
    def report(self, value: DatasetReport) -> None:
        self._report = value

    def __len__(self) -> int:
        return len(self.catalog)

    def with_seed(self, seed: int) -> StokerDataset:
        """The same dataset (arrays shared, not copied) with another augmentation seed."""
        twin = object.__new__(StokerDataset)
        twin.__dict__.update(self.__dict__)
        twin.seed = seed
        return twin

    def for_workers(self) -> StokerDataset:
        """The twin that DataLoader workers run: batches travel in a cheaper form, `arrive` finishes.

        - Float images travel as uint8. A float batch of four 1 MP images is 48 MiB that a worker
          writes into fresh shared memory and the main process maps; as uint8 it is 12 MiB, and
          the conversion (one pass per plane in the main process) is the same arithmetic, so
          batches are bitwise the same. Measured in issue #11: 2 workers reached 0.69 of twice one
          process with float batches, 0.81 with uint8.
        - Small tensors (loss weights, sizes, multipliers) travel inside the batch's pickle as
          NumPy arrays. Each tensor sent as a tensor costs a shared-memory segment in the worker
          and a file-descriptor handshake (a socket connection with an HMAC challenge) in both
          processes: five of the six tensors of a batch, about 1 ms of the main process's time
          per image on 2 CPUs (issue #11).
        """
        twin = object.__new__(type(self))  # a subclass stays itself in the workers
        twin.__dict__.update(self.__dict__)
        twin.small_in_transit = True
        if self.output != "float":
            return twin
        float_bytes = 4 * self._largest_batch_bytes()
        if self.float_transit == "blocks" and reused_shared_blocks(FLOAT_BLOCKS * float_bytes):
            # float batches written once, in the worker, into blocks lent to the loop as they are
            twin.float_in_blocks = True
            twin.shared_blocks = SharedBlocks(blocks=FLOAT_BLOCKS, block_bytes=float_bytes)
        else:  # uint8 in blocks that hold the largest uint8 batch, given back on arrival
            twin.uint8_in_transit = True
            twin.shared_blocks = SharedBlocks(block_bytes=self._largest_batch_bytes())
        return twin

    def batch_cost(self, keys: Sequence[Any]) -> float:
        """An estimate of the work of one batch of its sampler: its images' source pixels, plus
        a megapixel each for resizing, cropping and converting (for `dispatch`)."""
        images = np.array([int(key[2]) for key in keys], dtype=np.int64)
        pixels = self.catalog.widths[images].astype(np.float64) * self.catalog.heights[images]
        return float(pixels.sum()) + 1e6 * len(images)

    @property
    def transit_block_bytes(self) -> int:
        """Bytes of shared memory (``/dev/shm``, so RAM, that a worker's USS does not show once
        the main process maps them too) each worker keeps at most for the batches it sends:
        its blocks times what each holds (0 when batches cross in fresh segments). The blocks are
        made only when used, so this is the most, not what a short run reached."""
        if not (self.uint8_in_transit or self.float_in_blocks) or not reused_shared_blocks():
            return 0  # fresh segments only (off x86-64 every batch takes one)
        return self.shared_blocks.blocks * self.shared_blocks.block_bytes

    @property
    def transit_batch_bytes(self) -> int:
        """Bytes of the largest batch's images as they cross from a worker: float in blocks, else
        uint8 (what a worker writes into shared memory)."""
        return (4 if self.float_in_blocks else 1) * self._largest_batch_bytes()

    def _largest_batch_bytes(self) -> int:
        """Bytes of the largest uint8 image batch its buckets and batch sizes make."""
        if len(self.groups) == 0:
            return 0
        pixels = self.bucket_wh[:, 0] * self.bucket_wh[:, 1] * self.batch_sizes[self.groups]
        return int(pixels.max()) * 3

    def arrive(self, batch: Any) -> Any:
        """Finish a batch where it is consumed: what `for_workers` sent cheaply becomes what the
        batch promises (uint8 images become float, small arrays become tensors).

        The loader calls this in the main process for each batch; other batches pass unchanged.
        A pinned batch (``pin_memory``) gets a pinned result.
        """
        sent_cheaply = self.small_in_transit or self.uint8_in_transit or self.float_in_blocks
        if not sent_cheaply or not isinstance(batch, dict):
            return batch
        if self.small_in_transit:
            pinned = _is_pinned(batch)
            for key, value in batch.items():
                if isinstance(value, _Inline):
                    tensor = torch.from_numpy(value.array)
                    batch[key] = tensor.pin_memory() if pinned else tensor.clone()
        if self.float_in_blocks:
            for key in ("images", "conditioning_images"):
                value = batch.get(key)
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    lent = self.arrived.lend(value)  # its block goes back when the loop drops it
                    if lent is not None:
                        batch[key] = lent
            return batch
        if not self.uint8_in_transit:
            return batch
        for key in ("images", "conditioning_images"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                batch[key] = _uint8_to_float(value, self.buffers)
                self.arrived.give_back(value)  # read: its worker may write the next batch there
        return batch

    def drop(self, batch: Any) -> None:
        """A batch that will never `arrive` (torch dropped it unseen, see
        `stoker.torch_internals.dispatch_by_work`): give its images' shared-memory blocks back
        to their worker."""
        if not isinstance(batch, dict) or not (self.uint8_in_transit or self.float_in_blocks):
            return
        for key in ("images", "conditioning_images"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                self.arrived.give_back(value)

    def make_batch_sampler(
        self,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        even_batches: Literal["pad", "drop"] = "pad",
    ) -> BucketBatchSampler:
        """The sampler of whole bucket batches for this dataset (see ``data/sampler.py``)."""
        return BucketBatchSampler(
            groups=self.groups,
            repeats=self.repeats,
            batch_sizes=self.batch_sizes,
            seed=seed,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            even_batches=even_batches,
            dataset_id=self._dataset_id(),
        )

    def _dataset_id(self) -> str:
        if self._catalog_id is None:
            self._catalog_id = self.catalog.fingerprint()
        return self._catalog_id

    def batch_sizes_in_use(self) -> list[int]:
        """The distinct batch sizes of its datasets' configs."""
        return sorted({int(b) for b in self.batch_sizes})

    def fingerprint(self) -> str:
        """A digest of what makes loading it fast or slow: batch layout, paths, image sizes,
        buckets and every subset setting (the tuner's remembered choice is keyed on it)."""
        catalog = self.catalog
        digest = hashlib.blake2b(digest_size=16)
        sampler = self.make_batch_sampler(seed=0, shuffle=False)
        digest.update(str(sampler.state_dict()["fingerprint"]).encode())
        blob, offsets = catalog.paths.__getstate__()
        digest.update(blob)
        digest.update(np.asarray(offsets, "<i8").tobytes())
        for array in (catalog.widths, catalog.heights, self.bucket_wh, self.resized_wh):
            digest.update(np.asarray(array, "<i8").tobytes())
        settings = (
            type(self).__qualname__,
            self.output,
            self.fast_decode,
            repr(_spelling_free(catalog.subsets)),
            repr(_spelling_free(self.datasets)),
        )
        digest.update(repr(settings).encode())
        return digest.hexdigest()

    def sample_paths(self, batch: Sequence[Any]) -> list[str]:
        """The image files behind one batch of its sampler (keys are (epoch, position, image,
        step))."""
        return [self.catalog.paths[int(key[2])] for key in batch]

    def __getitem__(self, key: int | tuple[int, int, int, int]) -> dict[str, Any]:
        """One sample as a batch of one; an int means that image at epoch 0, position = image."""
        if isinstance(key, (int, np.integer)):
            key = (0, int(key), int(key), 0)
        return self.__getitems__([key])

    def __getitems__(self, keys: Sequence[Sequence[int]]) -> dict[str, Any]:
        """A batch of the samples at ``keys``.

        A sample whose file fails to decode (or is no longer the size the scan saw) is replaced by
        another image of its bucket; when none decodes, the slot is dropped and the batch is
        smaller (an ``"empty"`` batch when nothing is left, which the loader skips). Either way the
        files are in ``batch["replaced"]`` as `Problem` records, which the loader adds to
        ``dataset.report``. With ``on_error="raise"`` the first such file raises `DatasetError`.
        """
        samples, replaced = [], []
        for key in keys:
            sample, problems = self._sample_or_replacement(tuple(int(k) for k in key))
            if sample is not None:
                samples.append(sample)
            replaced += problems
        if not samples:
            return {"empty": True, "replaced": replaced, "images": None, "captions": []}
        batch = _collate(
            samples,
            float_images=self.output == "float" and not self.uint8_in_transit,
            buffers=self.buffers,
            shared=self.shared_blocks if self.uint8_in_transit or self.float_in_blocks else None,
        )
        if self.text is not None:  # cached text-encoder outputs of the final captions
            batch |= self.text.collate(batch["captions"])
        batch["replaced"] = replaced
        if self.small_in_transit:
            _inline_small_tensors(batch)
        _share_in_worker(batch)
        return batch

    # --- one sample ------------------------------------------------------------------------

    def _sample_or_replacement(
        self, key: tuple[int, ...]
    ) -> tuple[dict[str, Any] | None, list[Problem]]:
        epoch, position, image, step = key
        problems: list[Problem] = []
        try:
            return self._sample(image, epoch, position, step), problems
        except ImageProblem as err:
            problems.append(self._decode_problem(image, err))
        # Only a failure pays for finding the bucket's other images.
        for index in self._replacements(image, epoch, position):
            try:
                return self._sample(index, epoch, position, step), problems
            except ImageProblem as err:
                problems.append(self._decode_problem(index, err))
        # Nothing in the bucket decodes: the slot is dropped, the epoch goes on.
        problems[0] = dataclasses.replace(problems[0], action="skipped")
        return None, problems

    def _decode_problem(self, index: int, err: ImageProblem) -> Problem:
        path = self.catalog.paths[index]
        if self.on_error == "raise":
            raise DatasetError(
                f"{path}: {err.reason} (found while making a batch; on_error='raise'). Fix or "
                "remove the file, or load with on_error='warn' to replace and report it."
            )
        return Problem(
            path=path,
            reason=err.reason,
            kind="size_changed" if err.size_changed else "decode_failed",
            subset=int(self.catalog.subset[index]),
            stage="decode",
            action="replaced",
        )

    def _replacements(self, image: int, epoch: int, position: int) -> list[int]:
        same = np.flatnonzero(self.groups == self.groups[image])
        same = same[same != image]
        if len(same) == 0:
            return []
        rng = keyed_rng(self.seed, epoch, position, Stream.REPLACE)
        count = min(_REPLACEMENT_TRIES, len(same))
        return [int(i) for i in rng.choice(same, size=count, replace=False)]

    def _sample(self, index: int, epoch: int, position: int, step: int) -> dict[str, Any]:
        subset_index = int(self.catalog.subset[index])
        subset = self.catalog.subsets[subset_index]
        dataset = self.datasets[self.catalog.dataset_of_subset[subset_index]]
        path = self.catalog.paths[index]
        rng = keyed_rng(self.seed, epoch, position, Stream.IMAGE)
        original_wh = (int(self.catalog.widths[index]), int(self.catalog.heights[index]))
        bucket = (int(self.bucket_wh[index, 0]), int(self.bucket_wh[index, 1]))
        resized = (int(self.resized_wh[index, 0]), int(self.resized_wh[index, 1]))
        interpolation = subset.resize_interpolation or dataset.resize_interpolation
        flip = bool(subset.flip_aug and rng.random() < 0.5)
        face = parse_face_info(Path(path).stem) if subset.face_crop_aug_range else None
        pixels: np.ndarray | None = None
        if self.latents is not None:
            # The cache holds both views; noise is keyed like every other draw (stoker.cache).
            noise_seed = int(keyed_rng(self.seed, epoch, position, Stream.LATENT).integers(2**63))
            latent = self.latents.sample(index, flip, noise_seed)
            crop = conditioning_crop_top_left(original_wh, bucket, flipped=flip)
        elif face is not None and not dataset.enable_bucket:
            pixels = self._face_sample(index, subset, face, bucket, rng, interpolation, flip)
            crop = (0, 0)
        else:
            pixels = self._decode_fit(index, resized, bucket, rng, flip)
            crop = conditioning_crop_top_left(original_wh, bucket, flipped=flip)
        if subset.color_aug and pixels is not None:
            pixels[..., :3] = color_aug(np.ascontiguousarray(pixels[..., :3]), rng)
        sample: dict[str, Any] = {
            "pixels": pixels if pixels is not None else latent,
            "caption": self._caption(index, subset_index, epoch, position, step),
            "loss_weight": dataset.prior_loss_weight if subset.is_reg else 1.0,
            "original_size_hw": (original_wh[1], original_wh[0]),
            "crop_top_left": crop,
            "target_size_hw": (bucket[1], bucket[0]),
            "flipped": flip,
            "network_multiplier": dataset.network_multiplier,
            "custom_attributes": dict(subset.custom_attributes),
            "image_key": path,
            "alpha": subset.alpha_mask,
        }
        if self.has_conditioning:
            sample["conditioning"] = self._conditioning(
                index, resized, bucket, epoch, position, interpolation, flip
            )
        return sample

    def _decode(
        self,
        path: str,
        resized: tuple[int, int],
        *,
        alpha: bool,
        expect_size: tuple[int, int] | None = None,
    ) -> Any:
        """The fast path (JPEG at a reduced DCT scale) or the exact one (full decode, Pillow)."""
        if self.fast_decode:
            return decode_scaled(path, size_wh=resized, alpha=alpha, expect_size=expect_size)
        return open_image(path, alpha=alpha, expect_size=expect_size)

    def _decode_fit(
        self,
        index: int,
        resized: tuple[int, int],
        bucket: tuple[int, int],
        rng: np.random.Generator,
        flip: bool,
    ) -> np.ndarray:
        """Decode the image at ``index``, resize it, crop it to its bucket and flip it."""
        subset = self.catalog.subsets[int(self.catalog.subset[index])]
        dataset = self.datasets[self.catalog.dataset_of_subset[int(self.catalog.subset[index])]]
        interpolation = subset.resize_interpolation or dataset.resize_interpolation
        img = self._decode(
            self.catalog.paths[index],
            resized,
            alpha=subset.alpha_mask,
            expect_size=(int(self.catalog.widths[index]), int(self.catalog.heights[index])),
        )
        return _fit(img, subset, resized, bucket, rng, interpolation, flip, self.fast_decode)

    def view_pixels(self, index: int) -> np.ndarray:
        """The image at ``index`` as every epoch sees it before flip: ``(H, W, C)`` uint8.

        Decoded, resized and centre-cropped to its bucket exactly as a training sample is (the
        latent cache encodes this, and its mirror image for ``flip_aug``).
        """
        resized = (int(self.resized_wh[index, 0]), int(self.resized_wh[index, 1]))
        bucket = (int(self.bucket_wh[index, 0]), int(self.bucket_wh[index, 1]))
        return self._decode_fit(index, resized, bucket, keyed_rng(0, 0, index, Stream.IMAGE), False)

    def _face_sample(
        self,
        index: int,
        subset: SubsetConfig,
        face: tuple[int, int, int, int],
        bucket: tuple[int, int],
        rng: np.random.Generator,
        interpolation: str | None,
        flip: bool,
    ) -> np.ndarray:
        assert subset.face_crop_aug_range is not None
        path = self.catalog.paths[index]
        original_wh = (int(self.catalog.widths[index]), int(self.catalog.heights[index]))
        img = np.asarray(open_image(path, alpha=subset.alpha_mask, expect_size=original_wh))
        out = face_crop(
            img,
            face_center_wh=(face[0], face[1]),
            face_size_wh=(face[2], face[3]),
            face_crop_aug_range=subset.face_crop_aug_range,
            resolution_wh=bucket,
            rng=rng,
            random_crop=subset.random_crop,
            interpolation=interpolation,
        )
        return np.array(out[:, ::-1] if flip else out, order="C")

    def _conditioning(
        self,
        index: int,
        resized: tuple[int, int],
        bucket: tuple[int, int],
        epoch: int,
        position: int,
        interpolation: str | None,
        flip: bool,
    ) -> np.ndarray:
        path = self.catalog.conditioning[index]
        # The image's own generator again: a random crop lands on the same pixels.
        rng = keyed_rng(self.seed, epoch, position, Stream.IMAGE)
        subset = self.catalog.subsets[int(self.catalog.subset[index])]
        if subset.flip_aug:
            rng.random()  # the flip draw, so the crop draws below match the image's
        img = self._decode(path, resized, alpha=False)
        return _fit(img, subset, resized, bucket, rng, interpolation, flip, self.fast_decode)

    def _caption(self, index: int, subset_index: int, epoch: int, position: int, step: int) -> str:
        rng = keyed_rng(self.seed, epoch, position, Stream.CAPTION)
        return process_caption(
            self.catalog.captions[index],
            self.caption_rules[subset_index],
            rng,
            epoch=epoch,
            step=step,
            max_train_steps=self.max_train_steps,
        )


def _fit(
    img: Any,
    subset: SubsetConfig,
    resized: tuple[int, int],
    bucket: tuple[int, int],
    rng: np.random.Generator,
    interpolation: str | None,
    flip: bool,
    fast: bool,
) -> np.ndarray:
    """Resize to cover the bucket, crop (centred or random, per the subset) and flip."""
    pixels, _ = resize_crop(
        img,
        resized_wh=resized,
        bucket_wh=bucket,
        random_crop=subset.random_crop,
        rng=rng,
        interpolation=interpolation,
        flip=flip,
        fast=fast,
    )
    return pixels


def _collate(
    samples: list[dict[str, Any]],
    *,
    float_images: bool,
    buffers: BatchBuffers | None = None,
    shared: SharedBlocks | None = None,
) -> dict[str, Any]:
    """Stack samples of one bucket into sd-scripts' batch dict."""
    pixels = [s["pixels"] for s in samples]
    batch: dict[str, Any] = {}
    if isinstance(pixels[0], torch.Tensor):  # latents from the cache (stoker.cache)
        batch["latents"] = torch.stack(pixels)
    else:
        batch["images"] = _planes(
            [p[..., :3] for p in pixels], float_images=float_images, buffers=buffers, shared=shared
        )
    batch |= {
        "captions": [s["caption"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_size_hw"] for s in samples]),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples]),
        "target_sizes_hw": torch.tensor([s["target_size_hw"] for s in samples]),
        "flippeds": [s["flipped"] for s in samples],
        "network_multipliers": torch.tensor(
            [s["network_multiplier"] for s in samples], dtype=torch.float32
        ),
        "custom_attributes": [s["custom_attributes"] for s in samples],
        "image_keys": [s["image_key"] for s in samples],
    }
    if any(s["alpha"] for s in samples):
        masks = [
            alpha_to_mask(p) if p.shape[2] == 4 else np.ones(p.shape[:2], np.float32)
            for p in pixels
        ]
        batch["alpha_masks"] = torch.from_numpy(np.stack(masks))
    if "conditioning" in samples[0]:
        cond = [s["conditioning"] for s in samples]
        batch["conditioning_images"] = _planes(
            cond, float_images=float_images, buffers=buffers, shared=shared
        )
    return batch


# Tensors up to this size cross the worker queue inside the batch's pickle (`for_workers`).
_INLINE_BYTES = 1 << 16


class _Inline:
    """A small tensor of a batch in transit from a worker, as a NumPy array pickled by value."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Inline, (self.array,))


def _is_pinned(batch: dict[str, Any]) -> bool:
    """Whether the loader pinned this batch (its tensors are all pinned or all not)."""
    return any(isinstance(v, torch.Tensor) and v.is_pinned() for v in batch.values())


def _inline_small_tensors(batch: dict[str, Any]) -> None:
    """Replace the batch's small CPU tensors with `_Inline` arrays (same keys, same order)."""
    for key, value in batch.items():
        if (
            isinstance(value, torch.Tensor)
            and value.device.type == "cpu"
            and value.nbytes <= _INLINE_BYTES
            and value.dtype in _NUMPY_DTYPES
            and not value.requires_grad
        ):
            batch[key] = _Inline(value.contiguous().numpy())


_NUMPY_DTYPES = frozenset(
    {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.float32, torch.float64}
)


def _share_in_worker(batch: dict[str, Any]) -> None:
    """In a loader worker, move the batch's tensors into shared memory now.

    PyTorch otherwise does it in the worker's queue thread while pickling, where a full /dev/shm
    only prints "unable to allocate shared memory" and drops the batch: the worker lives on and the
    training loop waits forever. Here the error is raised in the worker's own loop, reaches the main
    process within the batch, and the loader turns it into ``SharedMemoryFull``. The copy is the one
    PyTorch would make anyway (a tensor already in shared memory is sent as is).
    """
    if torch.utils.data.get_worker_info() is None:
        return
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.share_memory_()  # type: ignore[no-untyped-call]


_HALF_RANGE = np.float32(127.5)


def _planes(
    pixels: list[np.ndarray],
    *,
    float_images: bool,
    buffers: BatchBuffers | None = None,
    shared: SharedBlocks | None = None,
) -> torch.Tensor:
    """HWC uint8 images (views allowed) into one new NCHW tensor: uint8, or float in [-1, 1].

    Each colour plane is read once from its strided view and written once into the batch, already
    converted: for a 1 MP image about 1 to 3 ms, against 5 to 12 ms for stacking, transposing and
    then converting the whole batch in three passes (issue #11). ``x / 127.5 - 1`` in float32 is
    the arithmetic of `to_float_images`, so the values are bitwise the same.
    """
    height, width = pixels[0].shape[:2]
    batch = _batch_tensor(
        (len(pixels), 3, height, width),
        torch.float32 if float_images else torch.uint8,
        buffers,
        shared,
    )
    out = batch.numpy()
    for n, image in enumerate(pixels):
        for c in range(3):
            if float_images:
                _plane_to_float(image[..., c], out[n, c])
            else:
                out[n, c] = image[..., c]
    return batch


def _batch_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    buffers: BatchBuffers | None = None,
    shared: SharedBlocks | None = None,
) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, already in shared memory (in ``shared``'s reused
    blocks when given); else in ``buffers``' reused memory when given (`stoker.data.buffers`: no
    fresh pages to fault in per batch).

    A worker's batch goes to the main process through shared memory; a tensor in ordinary memory
    is first copied into a new shared segment there. Built in shared memory from the start (as
    torch's own ``default_collate`` does; see `stoker.torch_internals.new_shared_tensor`), it is
    sent as is: one copy of every batch less.
    """
    if torch.utils.data.get_worker_info() is not None:
        if shared is not None:
            return shared.empty(shape, dtype)
        return torch_internals.new_shared_tensor(shape, dtype)
    if buffers is not None:
        return buffers.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype)


def _plane_to_float(plane: np.ndarray, out: np.ndarray) -> None:
    np.divide(plane, _HALF_RANGE, out=out)
    np.subtract(out, np.float32(1.0), out=out)


def _uint8_to_float(images: torch.Tensor, buffers: BatchBuffers | None = None) -> torch.Tensor:
    """A uint8 batch from `_planes` to float32 in [-1, 1], plane by plane (see `_planes`); into
    ``buffers``' reused memory when given, unless the batch is pinned (then the result is too)."""
    source = images.contiguous().numpy()
    if buffers is not None and not images.is_pinned():
        out = buffers.empty(tuple(images.shape), torch.float32)
    else:
        out = torch.empty(images.shape, dtype=torch.float32, pin_memory=images.is_pinned())
    planes = source.reshape(-1, *source.shape[-2:])
    targets = out.numpy().reshape(planes.shape)
    for plane, target in zip(planes, targets, strict=True):
        _plane_to_float(plane, target)
    return out


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) to float32 in [-1, 1], as ``x / 127.5 - 1``.

    Use it on batches from ``output="uint8"`` datasets, after the copy to the GPU: a quarter of the
    bytes cross the worker queue and the host-to-device link.
    """
    return images.contiguous().to(torch.float32).div_(127.5).sub_(1.0)


# --- loading -------------------------------------------------------------------------------------


def load_dataset(
    source: str | os.PathLike[str],
    *,
    validation: bool = False,
    reg_data_dir: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    resolution: int | Sequence[int] | None = None,
    on_error: OnError = "warn",
    seed: int = 0,
    max_train_steps: int | None = None,
    output: Output = "float",
    fast_decode: bool = True,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    latent_cache: str | os.PathLike[str] | Literal[False] | None = None,
    text_cache: str | os.PathLike[str] | Literal[False] | None = None,
    vae: Any = None,
    links_outside: bool = False,
    **overrides: Any,
) -> StokerDataset:
    """Load an sd-scripts dataset as it is.

    Args:
        source: a dataset config (``.toml``, or ``.json`` with ``datasets``), a ``train_data_dir``
            of ``N_name`` folders, or fine-tuning metadata (``.json`` / ``.jsonl``).
        validation: return the validation part of ``validation_split`` instead of the training part.
        reg_data_dir: regularisation folders, for a ``train_data_dir`` source.
        image_dir: the images of a metadata source.
        resolution: training resolution, required unless the config sets it.
        on_error: bad files: ``"warn"`` skips them and warns once with the count; ``"skip"`` skips
            them silently; ``"raise"`` raises one ``DatasetError`` listing them all.
            Everything skipped is listed in ``dataset.report.problems`` either way.
        seed: the seed of every augmentation and of the validation split (unless the config sets
            ``validation_seed``); ``make_loader(seed=...)`` replaces it.
        max_train_steps: for token warm-up given as a fraction of training.
        output: ``"float"`` images in [-1, 1], or ``"uint8"`` (0..255) for `to_float_images` later.
        fast_decode: decode JPEGs at reduced scale when the target is at most half the size.
        threads: parallel header reads; default: the CPU budget.
        progress: ``progress(done, total)`` while scanning; default: a bar on stderr when it is a
            terminal and the dataset is large.
        latent_cache: a latent cache folder (``stoker.cache_latents``): batches carry ``latents``
            instead of ``images`` and no image is opened; every other key is unchanged. Also the
            ``latent_cache`` key of the config (``[general]`` or ``[[datasets]]``); ``False``
            loads images even when the config names a cache.
        text_cache: a text-encoder cache folder (``stoker.cache_text_encoder_outputs``): batches
            also carry the text encoders' outputs for each caption. Also a config key; ``False``
            ignores it.
        vae: encode stale and missing latents with this VAE (object or folder) instead of raising.
        links_outside: follow symlinks (images, captions) and metadata keys that lead out of
            their dataset folder, as in a symlink farm. By default they are skipped and reported
            as ``outside_root``, so a shared dataset folder cannot make a run read elsewhere.
        **overrides: dataset and subset keys (sd-scripts' command-line options), below the config.

    Raises:
        ConfigError: the config is invalid (the message names file, table and key).
        DatasetError: a folder is missing, nothing usable is left, or ``on_error="raise"`` found
            bad files.
        CacheError: a cache has stale or missing entries (counts, files and the command that
            fixes it), or a setting a cache cannot serve (``random_crop``, ``color_aug``, ...).
    """
    if on_error not in ("raise", "skip", "warn"):
        raise ValueError(f"on_error={on_error!r} is not valid: use 'warn', 'skip' or 'raise'")
    if output not in ("float", "uint8"):
        raise ValueError(f"output={output!r} is not valid: use 'float' or 'uint8'")
    group = _read_source(
        Path(source),
        reg_data_dir=reg_data_dir,
        image_dir=image_dir,
        resolution=resolution,
        overrides=overrides,
    )
    _check_warmup(group, max_train_steps)
    if threads is None:
        from stoker.system.cpu import cpu_budget

        threads = cpu_budget().cpus
    catalog, problems = scan_dataset(
        group.datasets,
        threads=threads,
        progress=progress or stderr_progress("stoker: scanning"),
        links_outside=links_outside,
    )
    catalog = _split(catalog, group.datasets, validation=validation, seed=seed)
    dataset = _build(
        catalog,
        group,
        problems,
        on_error=on_error,
        seed=seed,
        max_train_steps=max_train_steps,
        output=output,
        fast_decode=fast_decode,
        source=Path(source),
    )
    latents = (
        _cache_folder(group.datasets, "latent_cache") if latent_cache is None else latent_cache
    )
    text = _cache_folder(group.datasets, "text_cache") if text_cache is None else text_cache
    if latents or text:
        from stoker.cache import attach_caches  # the cache package sits above data

        attach_caches(dataset, latent_cache=latents or None, text_cache=text or None, vae=vae)
    return dataset


def _cache_folder(datasets: Sequence[DatasetConfig], key: str) -> Path | None:
    """The one cache folder the datasets' ``key`` names (set in [general] or each dataset)."""
    folders = {getattr(d, key) for d in datasets}
    if len(folders) > 1:
        where = ", ".join(f"{d.where}: {getattr(d, key)}" for d in datasets)
        raise ConfigError(
            f"{key} must name one folder for all datasets of a run (one cache holds them all), "
            f"got {where}; set {key} once in [general]"
        )
    folder = folders.pop()
    if folder is None:
        return None
    return Path(folder)


def _read_source(
    source: Path,
    *,
    reg_data_dir: Any,
    image_dir: Any,
    resolution: Any,
    overrides: Mapping[str, Any],
) -> DatasetGroupConfig:
    extra = dict(overrides)
    if resolution is not None:
        extra["resolution"] = resolution
    if source.is_dir():
        if resolution is None:
            raise DatasetError(f"{source} is a train_data_dir: give resolution= (e.g. 512)")
        return config_from_train_data_dir(source, reg_data_dir=reg_data_dir, **extra)
    if not source.exists():
        raise DatasetError(
            f"{source} does not exist; give a dataset config (.toml/.json), a train_data_dir "
            "folder of N_name subfolders, or a fine-tuning metadata file (.json/.jsonl)"
        )
    if source.suffix.lower() == ".toml" or (
        source.suffix.lower() == ".json" and _is_dataset_config(source)
    ):
        return parse_dataset_config(source, **extra)
    if source.suffix.lower() not in (".json", ".jsonl"):
        what = "an image" if source.suffix.lower() in _IMAGE_SUFFIXES else "not a dataset source"
        raise DatasetError(
            f"{source} is {what}; give the train_data_dir that holds its N_name folders, a "
            "dataset config (.toml/.json), or fine-tuning metadata (.json/.jsonl)"
        )
    if resolution is None:
        raise DatasetError(f"{source} is fine-tuning metadata: give resolution= (e.g. 1024)")
    return config_from_metadata(source, image_dir=image_dir, **extra)


_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def _check_warmup(group: DatasetGroupConfig, max_train_steps: int | None) -> None:
    """A token warm-up given as a fraction of training needs the length of training, now."""
    if max_train_steps is not None:
        return
    for dataset in group.datasets:
        for subset in dataset.subsets:
            if 0 < subset.token_warmup_step < 1:
                raise ConfigError(
                    f"{subset.where}: token_warmup_step = {subset.token_warmup_step} is a fraction "
                    "of max_train_steps, which is not known; pass load_dataset(..., "
                    "max_train_steps=N), or give token_warmup_step as a step count (>= 1)"
                )


def _is_dataset_config(path: Path) -> bool:
    """Whether a ``.json`` file is a dataset config rather than fine-tuning metadata, by its first key.

    A config's top level holds only ``general`` and ``datasets`` (sd-scripts' schema allows nothing
    else; a near miss such as ``dataset`` counts too, so the config parser can say "did you mean");
    metadata's keys are image paths. Reading the first key, not the whole file, spares a
    million-entry metadata file a second parse.
    """
    import difflib
    import json

    from stoker.data.inputs import UnusableFile, open_regular

    try:
        with open_regular(path) as handle:
            head = handle.read(1 << 16).decode("utf-8-sig", errors="replace").lstrip()
    except (OSError, UnusableFile):
        return True  # let the config parser report the problem with the file's name
    if not head.startswith("{"):
        return True
    try:
        key, _ = json.JSONDecoder().raw_decode(head[1:].lstrip())
    except ValueError:
        return True  # "{}" or broken JSON: the config parser names the problem
    names = ["datasets", "general"]
    return not isinstance(key, str) or bool(difflib.get_close_matches(key, names, cutoff=0.75))


def _split(
    catalog: Catalog, datasets: Sequence[DatasetConfig], *, validation: bool, seed: int
) -> Catalog:
    """Keep the training or the validation part of each subset (``validation_split``)."""
    if validation and not any(d.validation_split > 0 for d in datasets):
        raise DatasetError(
            "validation=True, but no dataset sets validation_split; add validation_split = 0.1 "
            "(for example) to the dataset, or load without validation=True"
        )
    keep_parts = []
    for s, owner in enumerate(catalog.dataset_of_subset):
        members = np.flatnonzero(catalog.subset == s)
        dataset = datasets[owner]
        # Regularisation images are never split: all stay in training, as in sd-scripts.
        if dataset.validation_split <= 0 or catalog.subsets[s].is_reg:
            keep_parts.append(np.empty(0, np.int64) if validation else members)
            continue
        split_seed = dataset.validation_seed if dataset.validation_seed is not None else seed
        order = keyed_rng(split_seed, 0, s, Stream.SPLIT).permutation(len(members))
        count = int(round(len(members) * dataset.validation_split))
        chosen = np.sort(order[:count]) if validation else np.sort(order[count:])
        keep_parts.append(members[chosen])
    keep = np.concatenate(keep_parts) if keep_parts else np.empty(0, np.int64)
    return catalog.select(np.sort(keep))


def _build(
    catalog: Catalog,
    group: DatasetGroupConfig,
    problems: list[Problem],
    *,
    on_error: OnError,
    seed: int,
    max_train_steps: int | None,
    output: Output,
    fast_decode: bool,
    source: Path,
) -> StokerDataset:
    n = len(catalog)
    bucket_wh = np.zeros((n, 2), np.int64)
    resized_wh = np.zeros((n, 2), np.int64)
    ok = np.zeros(n, bool)
    reports = []
    for d, dataset in enumerate(group.datasets):
        members = np.flatnonzero(_dataset_of(catalog) == d)
        spec = dataset.bucket_spec()
        sizes = np.stack([catalog.widths[members], catalog.heights[members]], axis=1)
        assignment = assign_buckets(sizes.reshape(-1, 2), spec)
        bucket_wh[members], resized_wh[members] = assignment.bucket_wh, assignment.resized_wh
        ok[members] = assignment.ok
        for member, good, reason in zip(members, assignment.ok, assignment.reasons, strict=True):
            if not good:
                problems.append(
                    Problem(
                        path=catalog.paths[int(member)],
                        reason=reason,
                        kind="too_small",
                        subset=int(catalog.subset[int(member)]),
                        stage="bucket",
                    )
                )
        reports.append(bucket_report(assignment))
    _apply_policy(problems, on_error, source)
    keep = np.flatnonzero(ok)
    if len(keep) == 0:
        raise DatasetError(f"{source}: no usable images" + _problem_summary(problems))
    catalog = catalog.select(keep)
    return _finish(
        catalog,
        group,
        problems,
        bucket_wh[keep],
        resized_wh[keep],
        reports,
        seed=seed,
        max_train_steps=max_train_steps,
        output=output,
        fast_decode=fast_decode,
        on_error=on_error,
    )


def _dataset_of(catalog: Catalog) -> np.ndarray:
    owners = np.asarray(catalog.dataset_of_subset, dtype=np.int64)
    return owners[catalog.subset] if len(owners) else np.zeros(0, np.int64)


def _finish(
    catalog: Catalog,
    group: DatasetGroupConfig,
    problems: list[Problem],
    bucket_wh: np.ndarray,
    resized_wh: np.ndarray,
    reports: list[BucketReport],
    *,
    seed: int,
    max_train_steps: int | None,
    output: Output,
    fast_decode: bool,
    on_error: OnError,
) -> StokerDataset:
    owner = _dataset_of(catalog)
    # A batch group is one (dataset, bucket) pair: batches never mix datasets or buckets.
    triples = np.stack([owner, bucket_wh[:, 0], bucket_wh[:, 1]], axis=1)
    _, groups = np.unique(triples, axis=0, return_inverse=True)
    groups = groups.reshape(-1).astype(np.int64)
    group_owner = np.zeros(int(groups.max()) + 1, np.int64)
    group_owner[groups] = owner
    batch_sizes = np.array([group.datasets[o].batch_size for o in group_owner], np.int64)
    repeats, notes = _repeats(catalog, owner)
    if int(repeats.sum()) == 0:
        raise DatasetError("nothing to train on: " + _why_nothing_to_train(catalog))
    notes += [f"skipped folder {name}: {why}" for name, why in group.skipped_dirs]
    dataset = StokerDataset(
        catalog=catalog,
        datasets=group.datasets,
        bucket_wh=bucket_wh,
        resized_wh=resized_wh,
        groups=groups,
        repeats=repeats,
        batch_sizes=batch_sizes,
        report=DatasetReport(
            images=0, samples_per_epoch=0, batches_per_epoch=0, subsets=(), problems=(), buckets=()
        ),
        seed=seed,
        max_train_steps=max_train_steps,
        output=output,
        fast_decode=fast_decode,
        on_error=on_error,
    )
    batches = len(dataset.make_batch_sampler(seed=seed, shuffle=False))
    dataset.report = DatasetReport(
        images=len(catalog),
        samples_per_epoch=int(repeats.sum()),
        batches_per_epoch=batches,
        subsets=_subset_summaries(catalog, repeats, problems),
        problems=tuple(problems),
        buckets=tuple(reports),
        notes=tuple(notes),
    )
    return dataset


def _why_nothing_to_train(catalog: Catalog) -> str:
    train = [i for i, s in enumerate(catalog.subsets) if not s.is_reg]
    if not train:
        return "there are only regularisation subsets (is_reg = true); add a training subset"
    used = set(np.unique(catalog.subset).tolist())
    if not used & set(train):
        folders = ", ".join(
            str(catalog.subsets[i].image_dir or catalog.subsets[i].metadata_file) for i in train
        )
        return (
            f"the training subsets have no usable images ({folders}), and regularisation "
            "images are balanced to the training samples, so they count 0 too; add images"
        )
    return "every training subset has num_repeats = 0; set num_repeats >= 1"


def _repeats(catalog: Catalog, owner: np.ndarray) -> tuple[np.ndarray, list[str]]:
    per_subset = np.array([s.num_repeats for s in catalog.subsets], np.int64)
    is_reg_subset = np.array([s.is_reg for s in catalog.subsets], bool)
    repeats = per_subset[catalog.subset] if len(per_subset) else np.zeros(0, np.int64)
    is_reg = is_reg_subset[catalog.subset] if len(per_subset) else np.zeros(0, bool)
    notes = []
    # sd-scripts balances regularisation images within each dataset.
    for d in np.unique(owner):
        members = np.flatnonzero(owner == d)
        balanced, message = balance_reg_repeats(repeats[members], is_reg[members])
        repeats[members] = balanced
        if message:
            notes.append(message)
    return repeats, notes


def _subset_summaries(
    catalog: Catalog, repeats: np.ndarray, problems: list[Problem]
) -> tuple[SubsetSummary, ...]:
    missing = np.zeros(len(catalog.subsets), np.int64)
    for p in problems:
        if p.kind == "missing_caption" and p.subset is not None:
            missing[p.subset] += 1
    summaries = []
    for s, subset in enumerate(catalog.subsets):
        members = catalog.subset == s
        folder = subset.image_dir or subset.metadata_file
        prefix = str(folder) if folder is not None else ""
        summaries.append(
            SubsetSummary(
                where=subset.where,
                folder=prefix,
                is_reg=subset.is_reg,
                num_repeats=subset.num_repeats,
                images=int(members.sum()),
                samples_per_epoch=int(repeats[members].sum()),
                missing_captions=int(missing[s]),
            )
        )
    return tuple(summaries)


def _problem_summary(problems: Sequence[Problem], limit: int = 5) -> str:
    if not problems:
        return ""
    shown = "; ".join(f"{p.path}: {p.reason}" for p in problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f" ({len(problems)} problems: {shown}{more})"


def _apply_policy(problems: Sequence[Problem], on_error: OnError, source: Path) -> None:
    skipped = [p for p in problems if p.action == "skipped"]
    if not problems:
        return
    if on_error == "raise":
        listing = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
        raise DatasetError(
            f"{source}: {len(problems)} input problems (on_error='raise'):\n{listing}\n"
            "Fix or remove these files, or load with on_error='warn' to skip them."
        )
    if on_error == "warn":
        warn(
            f"stoker skipped {len(skipped)} files and worked around {len(problems) - len(skipped)} "
            f"caption problems in {source}{_problem_summary(problems, 3)}; "
            "the full list is in dataset.report.problems (or run: stoker scan)",
            once=False,
        )
