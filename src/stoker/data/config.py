"""Parse sd-scripts dataset configs, ``N_name`` folders and fine-tuning metadata into frozen records.

stoker reads the datasets of kohya-ss/sd-scripts unchanged, so every key keeps sd-scripts' name,
default and place. Three sources become the same :class:`DatasetGroupConfig`:

- :func:`parse_dataset_config`: a ``--dataset_config`` file (TOML or JSON) with ``[general]``,
  ``[[datasets]]`` and ``[[datasets.subsets]]`` tables;
- :func:`config_from_train_data_dir`: the ``--train_data_dir`` / ``--reg_data_dir`` folder convention,
  where each subfolder named ``<repeats>_<class tokens>`` is one subset;
- :func:`config_from_metadata`: the ``--in_json`` fine-tuning metadata file (JSON or JSONL).

**Precedence.** A subset setting is taken from the first place that sets it: the subset table, its
``[[datasets]]`` table, ``[general]``, the keyword overrides (they play the part of sd-scripts'
command-line options), and last the defaults on :class:`SubsetConfig`. A dataset setting (``resolution``,
``batch_size``, the bucket keys...) skips the first step. Overrides use the command-line names too:
``train_batch_size`` and ``dataset_repeats`` stand for ``batch_size`` and ``num_repeats``, and the old
misspelling ``caption_extention`` for ``caption_extension``. An override of ``None`` counts as not given.

**Relative paths** in a config file are looked up first in the config file's folder, then in the working
directory, and the first that exists wins. sd-scripts only uses the working directory; looking beside
the config first makes a dataset folder portable, and the fallback keeps every config that worked with
sd-scripts working. A path found in neither place is a :class:`~stoker.errors.DatasetError` naming both.

**Stricter than sd-scripts, on purpose.** Unknown or misplaced keys, wrong types and out-of-range values
are :class:`~stoker.errors.ConfigError` with the file, table and key (sd-scripts shows voluptuous'
``extra keys not allowed @ data['datasets'][0]``). A missing ``image_dir`` is an error where sd-scripts
logs a warning and trains without it. Types follow sd-scripts' schema with two widenings: an integer is
accepted wherever a number is (sd-scripts rejects ``network_multiplier = 1``), and ``resolution`` also
takes the command-line form ``"512,768"``. A boolean is not accepted as an integer (voluptuous would take
``num_repeats = true``, since ``bool`` is an ``int`` in Python).
"""

from __future__ import annotations

import difflib
import json
import logging
import numbers
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from stoker.data.buckets import BucketSpec
from stoker.data.captions import CaptionRules
from stoker.errors import ConfigError, DatasetError
from stoker.warn import warn

__all__ = [
    "DatasetConfig",
    "DatasetGroupConfig",
    "SubsetConfig",
    "SubsetKind",
    "config_from_metadata",
    "config_from_train_data_dir",
    "load_metadata",
    "parse_dataset_config",
]

logger = logging.getLogger(__name__)

SubsetKind = Literal["dreambooth", "finetuning", "controlnet"]
_KINDS: tuple[SubsetKind, ...] = ("dreambooth", "finetuning", "controlnet")

# Value types, named for the messages users read.
_BOOL, _INT, _FLOAT, _STR, _PATH = "boolean", "integer", "number", "string", "path"
_SIZE, _RANGE, _TABLE = "size", "range", "table"
_EXPECTED = {
    _BOOL: "true or false",
    _INT: "an integer",
    _FLOAT: "a number",
    _STR: "a string",
    _PATH: "a non-empty path string",
    _SIZE: "an integer or [width, height]",
    _RANGE: "[low, high] (two numbers)",
    _TABLE: "a table of key = value pairs",
}

# sd-scripts' SUBSET_ASCENDABLE_SCHEMA plus the caption-dropout keys: allowed in every table.
_SUBSET_SHARED_KEYS = {
    "num_repeats": _INT,
    "shuffle_caption": _BOOL,
    "caption_separator": _STR,
    "keep_tokens": _INT,
    "keep_tokens_separator": _STR,
    "secondary_separator": _STR,
    "enable_wildcard": _BOOL,
    "caption_prefix": _STR,
    "caption_suffix": _STR,
    "caption_dropout_rate": _FLOAT,
    "caption_dropout_every_n_epochs": _INT,
    "caption_tag_dropout_rate": _FLOAT,
    "token_warmup_min": _INT,
    "token_warmup_step": _FLOAT,
    "flip_aug": _BOOL,
    "color_aug": _BOOL,
    "random_crop": _BOOL,
    "face_crop_aug_range": _RANGE,
    "custom_attributes": _TABLE,
    "resize_interpolation": _STR,
}
# DreamBooth's ascendable keys: caption files beside the images (ControlNet takes all but class_tokens).
_CAPTION_FILE_KEYS = {"caption_extension": _STR, "cache_info": _BOOL, "class_tokens": _STR}
_SUBSET_ONLY_KEYS = {
    "image_dir": _PATH,
    "metadata_file": _PATH,
    "conditioning_data_dir": _PATH,
    "is_reg": _BOOL,
    "alpha_mask": _BOOL,
}
_DATASET_KEYS = {
    "resolution": _SIZE,
    "batch_size": _INT,
    "enable_bucket": _BOOL,
    "min_bucket_reso": _INT,
    "max_bucket_reso": _INT,
    "bucket_reso_steps": _INT,
    "bucket_no_upscale": _BOOL,
    "network_multiplier": _FLOAT,
    "validation_split": _FLOAT,
    "validation_seed": _INT,
    "resize_interpolation": _STR,
    "skip_image_resolution": _SIZE,
    # stoker's caches (stoker.cache): folders, relative to the config file's folder.
    "latent_cache": _PATH,
    "text_cache": _PATH,
}
# Dataset settings that sd-scripts takes only from its command line, never from a config file.
_OVERRIDE_ONLY_KEYS = {"prior_loss_weight": _FLOAT, "debug_dataset": _BOOL}
_OVERRIDE_ALIASES = {
    "train_batch_size": "batch_size",
    "dataset_repeats": "num_repeats",
    "caption_extention": "caption_extension",
}
_KEY_TYPES = {
    **_SUBSET_SHARED_KEYS,
    **_CAPTION_FILE_KEYS,
    **_SUBSET_ONLY_KEYS,
    **_DATASET_KEYS,
    **_OVERRIDE_ONLY_KEYS,
}

# What a subset table of each kind adds to the shared keys (sd-scripts' *_SUBSET_*_SCHEMA).
_SUBSET_KIND_KEYS: dict[str, frozenset[str]] = {
    "dreambooth": frozenset(
        {"image_dir", "is_reg", "alpha_mask", "caption_extension", "cache_info", "class_tokens"}
    ),
    "finetuning": frozenset({"metadata_file", "image_dir", "alpha_mask"}),
    "controlnet": frozenset(
        {"image_dir", "conditioning_data_dir", "caption_extension", "cache_info"}
    ),
}
_DATASET_KIND_KEYS: dict[str, frozenset[str]] = {
    "dreambooth": frozenset(_CAPTION_FILE_KEYS),
    "finetuning": frozenset(),
    "controlnet": frozenset({"caption_extension", "cache_info"}),
}
_REQUIRED_KEYS = {
    "dreambooth": ("image_dir",),
    "finetuning": ("metadata_file",),
    "controlnet": ("image_dir", "conditioning_data_dir"),
}
_KIND_LABELS = {
    "dreambooth": ("DreamBooth", "its subsets have no metadata_file"),
    "finetuning": ("fine-tuning", "its subsets set metadata_file, which holds the captions"),
    "controlnet": ("ControlNet", "its subsets set conditioning_data_dir"),
}
_FOLDER_KEYS = frozenset({"image_dir", "conditioning_data_dir"})

# sd-scripts' validate_interpolation_fn accepts exactly these.
_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
_AT_LEAST = {
    "num_repeats": 0,
    "keep_tokens": 0,
    "caption_dropout_every_n_epochs": 0,
    "token_warmup_min": 0,
    "token_warmup_step": 0,
    "prior_loss_weight": 0,
    "batch_size": 1,
    "bucket_reso_steps": 1,
    "min_bucket_reso": 1,
    "max_bucket_reso": 1,
}
# sd-scripts' FineTuningDataset reads JSONL metadata lines keyed by this field.
_JSONL_IMAGE_KEY = "image_path"
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


_CAPTION_FIELDS = tuple(CaptionRules.__dataclass_fields__)


class _Invalid(Exception):
    """A value that fails its check; the caller adds where it came from."""


class _Wrong:
    """Marks a value of the wrong type (``None`` is a value too, in JSON)."""


_WRONG = _Wrong()


class _FrozenDict(Mapping[str, Any]):
    """A read-only mapping that pickles, unlike ``types.MappingProxyType``, so configs reach workers."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubsetConfig(CaptionRules):
    """One image folder or metadata file and how its samples are captioned and augmented.

    Fields other than ``kind`` and ``where`` are named, defaulted and checked as sd-scripts' subset keys.

    Attributes:
        kind: ``"dreambooth"`` (captions from files beside the images, or ``class_tokens``),
            ``"finetuning"`` (captions from ``metadata_file``) or ``"controlnet"`` (images paired with
            ``conditioning_data_dir``). Inferred as sd-scripts does; see :func:`parse_dataset_config`.
        where: Where the subset was defined, used in error messages, e.g.
            ``"train.toml, [[datasets]] #1 [[datasets.subsets]] #2"``.
        image_dir: Folder of images (required unless ``kind`` is ``"finetuning"``, whose metadata may
            hold absolute image paths). Absolute once parsed.
        metadata_file: Fine-tuning metadata, JSON or JSONL; see :func:`load_metadata`.
        conditioning_data_dir: ControlNet conditioning images, matched to ``image_dir`` by file stem.
        num_repeats: Times each image appears per epoch; 0 leaves the subset out, as in sd-scripts.
        is_reg: Regularization images (DreamBooth only). sd-scripts repeats or truncates them so they
            match the number of training images.
        class_tokens: Caption for images without a caption file (DreamBooth only).
        caption_extension: Caption file extension; a missing leading dot is added, as sd-scripts does.
        cache_info: Cache image sizes and captions in ``metadata_cache.json`` in ``image_dir``.
        shuffle_caption, caption_separator, keep_tokens, keep_tokens_separator,
        secondary_separator, enable_wildcard, caption_prefix, caption_suffix,
        caption_dropout_rate, caption_dropout_every_n_epochs, caption_tag_dropout_rate,
        token_warmup_min, token_warmup_step: the caption keys, declared once in
            `stoker.data.captions.CaptionRules` (this class extends it); `caption_rules` returns
            them alone.
        flip_aug: Random horizontal flips.
        color_aug: Weak random hue and gamma changes.
        random_crop: Crop at a random position instead of the center.
        face_crop_aug_range: ``(low, high)`` face-size scale range for face-centred crops.
        alpha_mask: Use the alpha channel as a loss mask.
        custom_attributes: Free-form values passed through to each sample, read-only.
        resize_interpolation: One of ``lanczos, nearest, bilinear, linear, bicubic, cubic, area, box``;
            ``None`` uses area to shrink and lanczos to enlarge.
    """

    kind: SubsetKind = "dreambooth"
    where: str = ""
    image_dir: Path | None = None
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    alpha_mask: bool = False
    custom_attributes: Mapping[str, Any] = field(default_factory=_FrozenDict)
    resize_interpolation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"{self.where or 'SubsetConfig'}: kind must be one of {_KINDS}")
        _check_fields(self, skip=("kind", "where"))
        missing = [key for key in _REQUIRED_KEYS[self.kind] if getattr(self, key) is None]
        if missing:
            raise ConfigError(
                f"{self.where or 'SubsetConfig'}: a {_KIND_LABELS[self.kind][0]} subset needs "
                + " and ".join(missing)
            )
        _with_where(self.where or "SubsetConfig", self.caption_rules)

    def caption_rules(self) -> CaptionRules:
        """The caption keys of this subset as a `CaptionRules` (same names as sd-scripts' keys)."""
        return CaptionRules(**{name: getattr(self, name) for name in _CAPTION_FIELDS})


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetConfig:
    """Subsets that share a resolution, batch size and buckets: one sd-scripts ``[[datasets]]`` table.

    Attributes:
        subsets: The subsets, all of one kind, in file order with duplicates removed.
        resolution: ``(width, height)`` of the training area; a single number in a config means a square.
        batch_size: Samples per batch (``--train_batch_size``).
        enable_bucket: Group images into aspect-ratio buckets instead of cropping to ``resolution``.
        min_bucket_reso: Smallest bucket side.
        max_bucket_reso: Largest bucket side.
        bucket_reso_steps: Bucket sides are multiples of this.
        bucket_no_upscale: Never enlarge an image to fill a bucket.
        network_multiplier: Multiplier of the trained network for this dataset's samples.
        validation_split: Fraction in [0, 1) of images held out for validation.
        validation_seed: Seed of that split; ``None`` uses the training seed.
        resize_interpolation: Dataset default for subsets that do not set their own.
        skip_image_resolution: Leave out images whose area is at most this ``(width, height)``.
        latent_cache: stoker's latent cache folder for this dataset (``stoker.cache_latents``).
        text_cache: stoker's text-encoder cache folder (``stoker.cache_text_encoder_outputs``).
        prior_loss_weight: Loss weight of regularization images (command line only in sd-scripts).
        debug_dataset: sd-scripts' dataset preview mode (command line only in sd-scripts).
        validation: True for the held-out copy that the dataset builds from ``validation_split``.
        where: Where the dataset was defined, e.g. ``"train.toml, [[datasets]] #1"``.
    """

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    skip_image_resolution: tuple[int, int] | None = None
    latent_cache: Path | None = None
    text_cache: Path | None = None
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    validation: bool = False
    where: str = ""

    def __post_init__(self) -> None:
        where = self.where or "DatasetConfig"
        object.__setattr__(self, "subsets", tuple(self.subsets))
        if not self.subsets or not all(isinstance(s, SubsetConfig) for s in self.subsets):
            raise ConfigError(f"{where}: subsets must be one or more SubsetConfig")
        kinds = {subset.kind for subset in self.subsets}
        if len(kinds) > 1:
            raise ConfigError(
                f"{where}: subsets of one dataset must share a kind, got {sorted(kinds)}"
            )
        if not isinstance(self.validation, bool):
            raise ConfigError(f"{where}: validation must be true or false")
        _check_fields(self, skip=("subsets", "validation", "where"))
        if any(side % 8 for side in self.resolution):
            # No VAE of SD 1.x, 2.x, SDXL or SD3 takes a side that is not a multiple of 8 (the
            # latent is 1/8 of it); without bucketing the image would be cropped to it as is.
            raise ConfigError(
                f"{where}: resolution = {list(self.resolution)}: each side must be a multiple of 8 "
                f"(the VAE works on 8x8 blocks); use {[side - side % 8 for side in self.resolution]}"
                " for example"
            )
        _with_where(where, self.bucket_spec)

    def bucket_spec(self) -> BucketSpec:
        """The bucket keys of this dataset as a `BucketSpec` (sd-scripts' keys map one to one)."""
        return BucketSpec(
            resolution=self.resolution,
            enable_bucket=self.enable_bucket,
            min_reso=self.min_bucket_reso,
            max_reso=self.max_bucket_reso,
            reso_steps=self.bucket_reso_steps,
            no_upscale=self.bucket_no_upscale,
        )

    @property
    def kind(self) -> SubsetKind:
        """The kind shared by all subsets."""
        return self.subsets[0].kind


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetGroupConfig:
    """Everything one training run reads: sd-scripts' dataset group.

    Attributes:
        datasets: The datasets in file order.
        source: The config file, ``train_data_dir`` or metadata file this came from.
        skipped_dirs: ``(path, reason)`` for each folder under ``train_data_dir`` or ``reg_data_dir``
            that was left out because its name is not ``<repeats>_<class tokens>``.
    """

    datasets: tuple[DatasetConfig, ...]
    source: Path | None = None
    skipped_dirs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "skipped_dirs", tuple(tuple(s) for s in self.skipped_dirs))
        if not self.datasets:
            raise ConfigError(f"{self.source or 'DatasetGroupConfig'}: no datasets")


def _with_where(where: str, build: Any) -> None:
    """Run a record's own validation, naming the file and table in its error."""
    try:
        build()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Source:
    """Where relative paths and messages come from."""

    label: str  # the config path as the user wrote it
    folder: Path  # the config file's folder: first base for relative paths
    cwd: Path  # the working directory: second base, the only one sd-scripts uses


# --- public entry points -------------------------------------------------------------------------


def parse_dataset_config(
    path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None, **overrides: Any
) -> DatasetGroupConfig:
    """Read an sd-scripts ``--dataset_config`` file (``.toml`` or ``.json``).

    The file holds an optional ``[general]`` table and one or more ``[[datasets]]`` tables, each with
    one or more ``[[datasets.subsets]]``. Keys, their places and the order of precedence are described
    in the module docstring; the keys themselves on :class:`SubsetConfig` and :class:`DatasetConfig`.
    A dataset's kind comes from its subsets, as in sd-scripts: ``conditioning_data_dir`` makes it
    ControlNet, ``metadata_file`` fine-tuning, and neither DreamBooth; mixing kinds is an error.
    Duplicate subsets (same ``image_dir``, or same ``metadata_file``) keep the first, with a warning.

    Args:
        path: The config file; relative to ``cwd``.
        cwd: The working directory; defaults to the process's.
        **overrides: Settings below ``[general]`` in precedence, as sd-scripts' command-line options.

    Returns:
        The parsed config, paths absolute.

    Raises:
        ConfigError: The file cannot be read or parsed, or a key is unknown, misplaced or invalid.
        DatasetError: A path in the file exists neither beside the file nor in ``cwd``.
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    file = _absolute(base, path)
    source = _Source(label=str(path), folder=file.parent, cwd=base)
    general, datasets = _split_top_level(_read_config_file(file, source.label), source.label)
    general_layer = _check_table(general, "general", None, f"{source.label}, [general]")
    override_layer = _check_overrides(overrides)
    built = []
    for index, raw in enumerate(datasets, 1):
        dataset = _build_dataset(raw, index, source, (general_layer, override_layer))
        built.append(_cache_folders(dataset, source))
    return DatasetGroupConfig(datasets=tuple(built), source=file)


def config_from_train_data_dir(
    train_data_dir: str | os.PathLike[str],
    *,
    reg_data_dir: str | os.PathLike[str] | None = None,
    resolution: int | Sequence[int] | str,
    cwd: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> DatasetGroupConfig:
    """Build one DreamBooth dataset from sd-scripts' ``<repeats>_<class tokens>`` folder convention.

    Each subfolder of ``train_data_dir`` named like ``10_sks dog`` is a subset with ``num_repeats=10``
    and ``class_tokens="sks dog"``: the name is split at the first ``_``, and the part before it must be
    a whole number of at least 1 (a bare ``10`` gives empty class tokens). Other subfolders are left
    out, listed in ``skipped_dirs`` with the reason and warned about once; files are ignored.
    Subfolders of ``reg_data_dir`` become subsets with ``is_reg=True``. Folders are taken in name order
    (sd-scripts takes the file system's order). ``overrides`` apply as in :func:`parse_dataset_config`;
    the values from the folder name win over them.

    Raises:
        DatasetError: A folder is missing, or has no subfolder that follows the convention.
        ConfigError: An override is unknown or invalid.
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    layer = _check_overrides({**overrides, "resolution": resolution})
    subsets: list[SubsetConfig] = []
    skipped: list[tuple[str, str]] = []
    roots = [("train_data_dir", train_data_dir, False)]
    if reg_data_dir is not None:
        roots.append(("reg_data_dir", reg_data_dir, True))
    for label, given, is_reg in roots:
        found, left_out = _scan_repeat_folders(_absolute(base, given), label, given)
        skipped += left_out
        for folder, repeats, tokens in found:
            where = f"{label} '{given}', folder '{folder.name}'"
            values = {
                "image_dir": folder,
                "num_repeats": repeats,
                "class_tokens": tokens,
                "is_reg": is_reg,
            }
            subsets.append(_make_subset("dreambooth", where, [values, layer]))
    _warn_skipped(skipped)
    where = f"train_data_dir '{train_data_dir}'"
    dataset = _make_dataset(tuple(subsets), where, [layer])
    return DatasetGroupConfig(
        datasets=(dataset,), source=_absolute(base, train_data_dir), skipped_dirs=tuple(skipped)
    )


def config_from_metadata(
    metadata_file: str | os.PathLike[str],
    *,
    image_dir: str | os.PathLike[str] | None = None,
    resolution: int | Sequence[int] | str,
    cwd: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> DatasetGroupConfig:
    """Build one fine-tuning dataset from an ``--in_json`` metadata file and its ``--train_data_dir``.

    The file is checked to exist but not read; :func:`load_metadata` reads it. ``image_dir`` is needed
    when the metadata's image keys are not absolute paths. Overrides that fine-tuning does not use
    (``caption_extension``, ``class_tokens``, ``cache_info``) are ignored, as sd-scripts ignores them.

    Raises:
        DatasetError: The metadata file or ``image_dir`` does not exist.
        ConfigError: An override is unknown or invalid.
    """
    base = Path.cwd() if cwd is None else Path(cwd)
    layer = _check_overrides({**overrides, "resolution": resolution})
    values: dict[str, Any] = {
        "metadata_file": _existing(_absolute(base, metadata_file), "metadata_file", metadata_file)
    }
    if image_dir is not None:
        values["image_dir"] = _existing(_absolute(base, image_dir), "image_dir", image_dir)
    where = f"metadata_file '{metadata_file}'"
    subset = _make_subset("finetuning", where, [values, layer])
    dataset = _make_dataset((subset,), where, [layer])
    return DatasetGroupConfig(datasets=(dataset,), source=values["metadata_file"])


def load_metadata(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read sd-scripts fine-tuning metadata: image key -> ``{"caption", "tags", "image_size", ...}``.

    A ``.jsonl`` file holds one JSON object per line, keyed by its ``"image_path"`` field, the JSONL form
    sd-scripts' ``FineTuningDataset`` reads: ``{"image_path": "a.png", "caption": "...", "tags": "...",
    "image_size": [w, h]}``, where ``"width"`` and ``"height"`` may stand for ``image_size`` and win over
    it. Blank lines are skipped; when an image path repeats, the last line wins, with one warning.
    Any other file is one JSON object mapping image keys to entries, as ``merge_captions_to_metadata.py``
    writes it. An image key is an absolute path, or a path relative to the subset's ``image_dir``, with
    or without the extension. ``caption`` and ``tags`` must be strings or null, ``image_size`` and
    ``train_resolution`` ``[width, height]`` integers; other fields pass through untouched.

    Raises:
        DatasetError: The file cannot be read, is not valid JSON, or an entry has the wrong shape;
            the message names the file and the line or image key.
    """
    file = Path(path)
    text = _read_text(file, str(path), DatasetError)
    if file.suffix.lower() == ".jsonl":
        return _parse_metadata_jsonl(text, str(path))
    data = _decode_json(text, str(path), DatasetError)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: metadata must be a JSON object of image key -> entry")
    for key, entry in data.items():  # JSON object keys are already str; checked in place
        _check_metadata_entry(entry, str(path), key)
    return data


# --- reading files -------------------------------------------------------------------------------


def _read_text(file: Path, label: str, error: type[Exception]) -> str:
    """Read UTF-8 text, tolerating the byte-order mark Windows editors add."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{label}: file not found (looked for {file})") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise error(f"{label}: cannot read it ({exc.strerror})") from None


def _decode_json(text: str, label: str, error: type[Exception]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{label}, line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
        ) from None


def _read_config_file(file: Path, label: str) -> Any:
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(
            f"{label}: unsupported config format {suffix!r}; use a .toml or .json file"
        )
    text = _read_text(file, label, ConfigError)
    if suffix == ".json":
        return _decode_json(text, label, ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error_message(str(exc), label)) from None


def _toml_error_message(message: str, label: str) -> str:
    """Move tomllib's trailing "(at line 3, column 5)" to the front, where the other messages say where."""
    match = _TOML_POSITION.search(message)
    reason = message[: match.start()] if match else message
    if match and match.group(1):
        place = f"{label}, line {match.group(1)}, column {match.group(2)}"
    else:
        place = f"{label}, end of file" if match else label
    hint = ""
    if "\\" in reason:
        # The usual cause: a Windows path in double quotes, where "\h" is an invalid escape.
        hint = " (write Windows paths in single quotes, 'C:\\data', or with forward slashes)"
    return f"{place}: invalid TOML: {reason}{hint}"


def _split_top_level(raw: Any, label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check the two top-level entries sd-scripts accepts, ``general`` and ``datasets``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a table (a JSON object)")
    for key in raw:
        if key in ("general", "datasets"):
            continue
        if key == "subsets":
            hint = (
                "subsets belong to a dataset: write [[datasets.subsets]] after a [[datasets]] table"
            )
        elif key in _KEY_TYPES:
            hint = f"'{key}' must sit under [general] or a [[datasets]] table, not at the top level"
        else:
            hint = f"unknown top-level key '{key}'{_suggest(key, ('general', 'datasets'))}"
        raise ConfigError(f"{label}: {hint}")
    general = raw.get("general", {})
    if not isinstance(general, dict):
        raise ConfigError(f"{label}: general must be a table: write [general]")
    datasets = raw.get("datasets")
    if datasets is None or datasets == []:
        raise ConfigError(
            f"{label}: no [[datasets]] table; add one with at least one [[datasets.subsets]]"
        )
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError(
            f"{label}: datasets must be an array of tables: write [[datasets]], not [datasets]"
        )
    return general, datasets


# --- building records ----------------------------------------------------------------------------


def _build_dataset(
    raw: dict[str, Any], index: int, source: _Source, lower: tuple[dict[str, Any], ...]
) -> DatasetConfig:
    where = f"{source.label}, [[datasets]] #{index}"
    raw_subsets = raw.get("subsets")
    if isinstance(raw_subsets, dict):
        raise ConfigError(
            f"{where}: subsets must be an array of tables: write [[datasets.subsets]], not [datasets.subsets]"
        )
    if not raw_subsets or not all(isinstance(s, dict) for s in raw_subsets):
        raise ConfigError(
            f"{where}: no [[datasets.subsets]]; add one with image_dir (DreamBooth) "
            "or metadata_file (fine-tuning)"
        )
    kind = _infer_kind(raw_subsets, where)
    own = {key: value for key, value in raw.items() if key != "subsets"}
    layer = _check_table(own, "dataset", kind, where)
    subsets = []
    for number, raw_subset in enumerate(raw_subsets, 1):
        subset_where = f"{where} [[datasets.subsets]] #{number}"
        values = _check_table(raw_subset, "subset", kind, subset_where)
        for key in _REQUIRED_KEYS[kind]:
            if key not in values:
                raise ConfigError(
                    f"{subset_where}: missing {key}, which a {_KIND_LABELS[kind][0]} subset needs"
                )
        for key in _SUBSET_ONLY_KEYS.keys() & values.keys():
            if _KEY_TYPES[key] == _PATH:
                values[key] = _resolve_path(values[key], key, subset_where, source)
        subsets.append(_make_subset(kind, subset_where, [values, layer, *lower]))
    return _make_dataset(_drop_duplicates(subsets), where, [layer, *lower])


def _cache_folders(dataset: DatasetConfig, source: _Source) -> DatasetConfig:
    """Cache folders may not exist yet: relative ones are taken from the config file's folder."""
    latent, text = dataset.latent_cache, dataset.text_cache
    return replace(
        dataset,
        latent_cache=None if latent is None else _absolute(source.folder, latent.expanduser()),
        text_cache=None if text is None else _absolute(source.folder, text.expanduser()),
    )


def _make_subset(kind: SubsetKind, where: str, layers: Sequence[Mapping[str, Any]]) -> SubsetConfig:
    """Build a subset from checked layers, highest precedence first, keeping the keys its kind uses."""
    allowed = _SUBSET_SHARED_KEYS.keys() | _SUBSET_KIND_KEYS[kind]
    return SubsetConfig(kind=kind, where=where, **_merge(layers, allowed))


def _make_dataset(
    subsets: tuple[SubsetConfig, ...], where: str, layers: Sequence[Mapping[str, Any]]
) -> DatasetConfig:
    values = _merge(layers, _DATASET_KEYS.keys() | _OVERRIDE_ONLY_KEYS.keys())
    if "resolution" not in values:
        raise ConfigError(
            f"{where}: resolution is not set; add resolution = 512 (or [width, height]) to this "
            "table or [general], or pass resolution=... as an override"
        )
    return DatasetConfig(subsets=subsets, where=where, **values)


def _merge(layers: Sequence[Mapping[str, Any]], allowed: Iterable[str]) -> dict[str, Any]:
    """Take each allowed key from the first layer that sets it (sd-scripts' search_value)."""
    merged: dict[str, Any] = {}
    for key in allowed:
        for layer in layers:
            if key in layer:
                merged[key] = layer[key]
                break
    return merged


def _infer_kind(raw_subsets: list[dict[str, Any]], where: str) -> SubsetKind:
    """Decide a dataset's kind from its subsets' keys, as sd-scripts' BlueprintGenerator does."""
    kinds: list[SubsetKind] = []
    for raw in raw_subsets:
        if "conditioning_data_dir" in raw:
            kinds.append("controlnet")
        elif "metadata_file" in raw:
            kinds.append("finetuning")
        else:
            kinds.append("dreambooth")
    if len(set(kinds)) == 1:
        return kinds[0]
    groups = "; ".join(
        f"{_KIND_LABELS[kind][0]}: subsets "
        + ", ".join(f"#{number}" for number, k in enumerate(kinds, 1) if k == kind)
        for kind in dict.fromkeys(kinds)
    )
    raise ConfigError(
        f"{where}: mixes subset kinds ({groups}). A dataset has one kind (metadata_file makes it "
        "fine-tuning, conditioning_data_dir ControlNet, neither DreamBooth); split the subsets into "
        "separate [[datasets]] tables"
    )


def _drop_duplicates(subsets: list[SubsetConfig]) -> tuple[SubsetConfig, ...]:
    """Keep the first of subsets that read the same data, as sd-scripts' datasets do."""
    first: dict[tuple[Path | None, ...], SubsetConfig] = {}
    kept = []
    for subset in subsets:
        if subset.kind == "finetuning":
            identity: tuple[Path | None, ...] = (subset.metadata_file,)
        else:
            identity = (subset.image_dir, subset.conditioning_data_dir)
        if identity in first:
            warn(
                f"{subset.where}: ignored, it reads the same data as {first[identity].where} and "
                "sd-scripts uses only the first of duplicate subsets; raise num_repeats instead "
                "to see these images more often",
                once=False,
            )
            continue
        first[identity] = subset
        kept.append(subset)
    return tuple(kept)


# --- checking keys and values --------------------------------------------------------------------


def _check_table(
    table: Mapping[str, Any], level: str, kind: str | None, where: str
) -> dict[str, Any]:
    """Check each key's place and value; return the values in canonical form."""
    allowed = _allowed_keys(level, kind)
    checked: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: {_misplaced(key, level, kind, allowed)}")
        try:
            checked[key] = _coerce(key, value)
        except _Invalid as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return checked


def _check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check keyword overrides: the command-line layer, so command-line names are accepted too."""
    renamed: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:  # an unset command-line option
            continue
        name = _OVERRIDE_ALIASES.get(key, key)
        if name in renamed:
            raise ConfigError(f"overrides: {key} and {name} mean the same; pass only {name}")
        renamed[name] = value
    return _check_table(renamed, "override", None, "overrides")


def _allowed_keys(level: str, kind: str | None) -> frozenset[str]:
    if level == "subset" and kind is not None:
        return frozenset(_SUBSET_SHARED_KEYS.keys() | _SUBSET_KIND_KEYS[kind])
    shared = _SUBSET_SHARED_KEYS.keys() | _DATASET_KEYS.keys()
    if level == "dataset" and kind is not None:
        return frozenset(shared | _DATASET_KIND_KEYS[kind])
    if level == "override":
        return frozenset(shared | _CAPTION_FILE_KEYS.keys() | _OVERRIDE_ONLY_KEYS.keys())
    return frozenset(shared | _CAPTION_FILE_KEYS.keys())


def _misplaced(key: str, level: str, kind: str | None, allowed: frozenset[str]) -> str:
    """Say why ``key`` cannot be set here and where it belongs instead."""
    if key not in _KEY_TYPES:
        return f"unknown key '{key}'{_suggest(key, allowed)}"
    if key in _OVERRIDE_ONLY_KEYS:
        return f"'{key}' is a command-line option in sd-scripts, not a config key; pass it as an override"
    if key in _SUBSET_ONLY_KEYS and level != "subset":
        return f"'{key}' can only be set in a [[datasets.subsets]] table"
    if key in _DATASET_KEYS and level == "subset":
        return (
            f"'{key}' is a dataset setting shared by all its subsets; "
            "move it to the [[datasets]] table or to [general]"
        )
    label, reason = _KIND_LABELS[kind or "dreambooth"]
    table = "subset" if level == "subset" else "dataset"
    return f"'{key}' does not apply to a {label} {table} ({reason}); remove it"


def _suggest(key: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, sorted(candidates), n=1)
    if not matches:
        matches = difflib.get_close_matches(key, sorted(_KEY_TYPES), n=1)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _coerce(key: str, value: Any) -> Any:
    """Return ``value`` in canonical form (tuples, floats, Paths), or raise _Invalid saying why."""
    tag = _KEY_TYPES[key]
    converted = _convert(tag, value)
    if converted is _WRONG:
        hint = " (remove the key to use the default)" if value is None else ""
        raise _Invalid(f"{key} must be {_EXPECTED[tag]}, got {_describe(value)}{hint}")
    problem = _value_problem(key, converted)
    if problem:
        raise _Invalid(f"{key} = {_describe(value, with_type=False)} {problem}")
    if key == "caption_extension" and converted and not converted.startswith("."):
        converted = "." + converted  # sd-scripts adds the dot too
    return converted


def _convert(tag: str, value: Any) -> Any:
    if tag == _BOOL:
        return value if isinstance(value, bool) else _WRONG
    if tag == _INT:
        return int(value) if _is_number(value, integral=True) else _WRONG
    if tag == _FLOAT:
        return float(value) if _is_number(value, integral=False) else _WRONG
    if tag == _STR:
        return value if isinstance(value, str) else _WRONG
    if tag == _PATH:
        ok = isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip() != "")
        return Path(value) if ok else _WRONG
    if tag == _TABLE:
        return _freeze(value) if isinstance(value, Mapping) else _WRONG
    return _convert_pair(value, integral=tag == _SIZE)


def _convert_pair(value: Any, *, integral: bool) -> Any:
    """A ``[a, b]`` pair, or the command-line form ``"a,b"``; a size also takes one integer (a square)."""
    scalar: type[int] | type[float] = int if integral else float
    if isinstance(value, (list, tuple)):
        if not all(_is_number(item, integral=integral) for item in value):
            return _WRONG
        items = [scalar(item) for item in value]
    elif isinstance(value, str):
        try:
            items = [scalar(part) for part in value.split(",")]
        except ValueError:
            return _WRONG
        if integral and len(items) == 1:  # "512" on sd-scripts' command line is a square
            items = items * 2
    elif integral and _is_number(value, integral=True):
        items = [int(value), int(value)]
    else:
        return _WRONG
    return tuple(items) if len(items) == 2 else _WRONG


def _is_number(value: Any, *, integral: bool) -> bool:
    # bool is an int in Python, but `flip_aug = true` given as a number is a mistake, not a 1.
    expected = numbers.Integral if integral else numbers.Real
    return isinstance(value, expected) and not isinstance(value, bool)


def _value_problem(key: str, value: Any) -> str | None:
    if key in _AT_LEAST and not value >= _AT_LEAST[key]:
        return f"is too small: it must be {_AT_LEAST[key]} or more"
    if key in ("caption_dropout_rate", "caption_tag_dropout_rate") and not 0 <= value <= 1:
        return "is not a probability: it must be between 0 and 1"
    if key == "validation_split" and not 0 <= value < 1:
        return "must be at least 0 and below 1: it is the fraction of images held out"
    if key in ("resolution", "skip_image_resolution") and min(value) < 1:
        return "must be positive"
    if key == "face_crop_aug_range" and not 0 < value[0] <= value[1]:
        return "must be [low, high] with 0 < low <= high"
    if key == "resize_interpolation" and value not in _INTERPOLATIONS:
        return f"is not supported; use one of {', '.join(_INTERPOLATIONS)}"
    if key == "caption_separator" and value == "":
        return "must not be empty"
    return None


def _describe(value: Any, *, with_type: bool = True) -> str:
    """Show a value the way the config file spells it: ``string "ten"``, ``boolean true``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind, text = "boolean", str(value).lower()
    elif isinstance(value, numbers.Integral):
        kind, text = "integer", str(value)
    elif isinstance(value, numbers.Real):
        kind, text = "float", str(value)
    elif isinstance(value, str):
        kind, text = "string", json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (list, tuple)):
        kind, text = "array", json.dumps(list(value), default=str, ensure_ascii=False)
    elif isinstance(value, Mapping):
        kind, text = "table", "{...}"
    else:
        kind, text = type(value).__name__, repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kind} {text}" if with_type else text


def _freeze(value: Any) -> Any:
    """Deep read-only copy: tables become _FrozenDict and arrays tuples."""
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise _Invalid("custom_attributes keys must be strings")
        return _FrozenDict({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def _check_fields(record: Any, *, skip: tuple[str, ...]) -> None:
    """Put each field of a record in canonical form, rejecting values wrong in themselves."""
    where = record.where or type(record).__name__
    for spec in fields(record):
        value = getattr(record, spec.name)
        if spec.name in skip or (value is None and spec.default is None):
            continue
        try:
            object.__setattr__(record, spec.name, _coerce(spec.name, value))
        except _Invalid as exc:
            raise ConfigError(f"{where}: {exc}") from None


# --- paths and folders ---------------------------------------------------------------------------


def _resolve_path(given: Path, key: str, where: str, source: _Source) -> Path:
    """Find a path from a config file: beside the file first, then in the working directory."""
    given = given.expanduser()
    # One candidate when the path is absolute or both folders are the same.
    candidates = list(
        dict.fromkeys([_absolute(source.folder, given), _absolute(source.cwd, given)])
    )
    for candidate in candidates:
        if candidate.exists():
            return _check_path_type(candidate, key, where)
    if given.is_absolute():
        looked = f"looked for {candidates[0]}"
    elif len(candidates) == 1:
        looked = (
            f"looked for {candidates[0]}; relative paths are read from {source.label}'s folder, "
            "then from the working directory"
        )
    else:
        looked = (
            f"looked for {candidates[0]}, relative to {source.label}'s folder, "
            f"and {candidates[1]}, relative to the working directory"
        )
    raise DatasetError(f"{where}: {key} '{given}' does not exist ({looked})")


def _absolute(base: Path, given: str | os.PathLike[str]) -> Path:
    """``given`` made absolute against ``base``, with ``~`` expanded and ``..`` folded."""
    return Path(os.path.abspath(base / Path(given).expanduser()))


def _check_path_type(path: Path, key: str, where: str) -> Path:
    if key in _FOLDER_KEYS and not path.is_dir():
        raise DatasetError(f"{where}: {key} '{path}' is a file, but it must be a folder of images")
    if key == "metadata_file" and path.is_dir():
        raise DatasetError(
            f"{where}: metadata_file '{path}' is a folder, but it must be a JSON file"
        )
    return path


def _existing(path: Path, key: str, given: str | os.PathLike[str]) -> Path:
    """Check a path given as an argument (relative to the working directory, as in sd-scripts)."""
    if not path.exists():
        raise DatasetError(f"{key} '{given}' does not exist (looked for {path})")
    return _check_path_type(path, key, f"{key} '{given}'")


def _parse_repeat_folder(name: str) -> tuple[int, str]:
    """Split ``"10_sks dog"`` into ``(10, "sks dog")`` the way sd-scripts does, or raise _Invalid."""
    head, _, tokens = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        raise _Invalid(
            "its name does not start with a repeat count: expected <repeats>_<class tokens>, "
            "e.g. '10_sks dog'"
        ) from None
    if repeats < 1:
        raise _Invalid(f"its repeat count {repeats} is less than 1")
    return repeats, tokens


def _scan_repeat_folders(
    root: Path, label: str, given: str | os.PathLike[str]
) -> tuple[list[tuple[Path, int, str]], list[tuple[str, str]]]:
    """List ``<repeats>_<class tokens>`` subfolders of ``root`` and the ones left out, with reasons."""
    convention = "subfolders named <repeats>_<class tokens>, e.g. '10_sks dog'"
    if not root.is_dir():
        state = "is not a folder" if root.exists() else f"does not exist (looked for {root})"
        raise DatasetError(f"{label} '{given}' {state}; it must hold {convention}")
    found: list[tuple[Path, int, str]] = []
    skipped: list[tuple[str, str]] = []
    for child in sorted(root.iterdir(), key=lambda path: path.name):
        if not child.is_dir():
            continue
        try:
            repeats, tokens = _parse_repeat_folder(child.name)
        except _Invalid as exc:
            skipped.append((str(child), str(exc)))
            continue
        found.append((child, repeats, tokens))
    if not found:
        left_out = "".join(f"; '{Path(path).name}': {reason}" for path, reason in skipped)
        raise DatasetError(f"{label} '{given}' has no {convention}{left_out}")
    return found, skipped


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    names = ", ".join(f"'{path}' ({reason})" for path, reason in skipped)
    message = (
        f"left out {len(skipped)} folder(s) that do not follow <repeats>_<class tokens>: {names}"
    )
    warn(message)


# --- metadata ------------------------------------------------------------------------------------


def _parse_metadata_jsonl(text: str, label: str) -> dict[str, dict[str, Any]]:
    metadata: dict[str, dict[str, Any]] = {}
    first_line: dict[str, int] = {}
    repeated: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{label}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: each line must be a JSON object")
        image = entry.pop(_JSONL_IMAGE_KEY, None)
        if not isinstance(image, str) or not image:
            raise DatasetError(
                f'{where}: missing "{_JSONL_IMAGE_KEY}"; each line needs '
                f'{{"{_JSONL_IMAGE_KEY}": "a.png", "caption": "..."}}'
            )
        if "width" in entry and "height" in entry:
            entry["image_size"] = [entry.pop("width"), entry.pop("height")]
        if image in metadata:
            repeated.append(f"'{image}' (lines {first_line[image]} and {number})")
        first_line.setdefault(image, number)
        metadata[image] = _check_metadata_entry(entry, where)
    if repeated:
        warn(
            f"{label}: {len(repeated)} image path(s) appear more than once, the last line wins as in "
            f"sd-scripts: {', '.join(repeated[:5])}",
            once=False,
        )
    return metadata


def _check_metadata_entry(entry: Any, label: str, key: str | None = None) -> dict[str, Any]:
    """Check one entry's shape; errors name ``label`` and the image ``key`` (formatted only then)."""
    where = label if key is None else _Where(label, key)
    if not isinstance(entry, dict):
        raise DatasetError(f'{_where(where)}: an entry must be an object like {{"caption": "..."}}')
    for key in ("caption", "tags"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise DatasetError(f"{_where(where)}: {key} must be a string, got {_describe(value)}")
    for key in ("image_size", "train_resolution"):
        value = entry.get(key)
        if value is None or _plain_size(value):
            continue
        pair = _convert_pair(value, integral=True)
        if pair is _WRONG or not isinstance(value, (list, tuple)) or min(pair) < 1:
            raise DatasetError(
                f"{_where(where)}: {key} must be [width, height], got {_describe(value)}"
            )
    return entry


def _plain_size(value: Any) -> bool:
    """The common ``[w, h]`` of positive ints, checked without the general converter (1M entries)."""
    return (
        type(value) is list
        and len(value) == 2
        and type(value[0]) is int
        and type(value[1]) is int
        and value[0] >= 1
        and value[1] >= 1
    )


class _Where:
    """``"<file>, image '<key>'"``, built only when an error needs it (a million entries)."""

    __slots__ = ("key", "label")

    def __init__(self, label: str, key: str) -> None:
        self.label, self.key = label, key

    def __str__(self) -> str:
        return f"{self.label}, image {self.key!r}"


def _where(where: str | _Where) -> str:
    return str(where)
