"""Scan a dataset once: image files, captions and header sizes, held in arrays that fork cheaply.

A catalog keeps per-image data in NumPy arrays and packed string tables rather than one Python
object per image: a forked worker that reads entry 900,000 touches a few pages of a byte blob
instead of bumping the reference counts of a million dicts (which copies them page by page), and
a spawned worker unpickles a handful of buffers.

Problems never stop a scan: each bad file becomes a ``Problem`` (path, reason, stage) in the
report, and the caller's ``on_error`` policy decides what to do with the list.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stoker.data.config import DatasetConfig, SubsetConfig, load_metadata
from stoker.data.images import ImageProblem, read_image_size
from stoker.errors import DatasetError
from stoker.files import atomic_write_text
from stoker.progress import progress_bar

__all__ = ["Catalog", "Problem", "StringTable", "scan_dataset", "image_extensions"]

_BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SCAN_CACHE_NAME = ".stoker-scan-cache.json"
_CACHE_VERSION = 1


def image_extensions() -> tuple[str, ...]:
    """Extensions scanned (lower case): png jpg jpeg webp bmp, plus avif/jxl when Pillow can read them."""
    from PIL import Image

    registered = Image.registered_extensions()
    extra = tuple(ext for ext in (".avif", ".jxl") if ext in registered)
    return _BASE_EXTENSIONS + extra


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """A file that could not be used as it is.

    Attributes:
        path: the file.
        reason: plain words (``"zero-byte file"``, ``"caption is not UTF-8"``).
        stage: ``"scan"`` (found while scanning), ``"bucket"`` (too small for any bucket) or
            ``"decode"`` (failed in a worker and was replaced).
        action: what stoker did: ``"skipped"``, ``"replaced"`` or ``"used class tokens"``.
    """

    path: str
    reason: str
    stage: str = "scan"
    action: str = "skipped"


class StringTable:
    """Many strings in one UTF-8 blob with offsets: O(1) lookup, no Python object per entry."""

    __slots__ = ("_blob", "_offsets")

    def __init__(self, blob: bytes, offsets: np.ndarray) -> None:
        self._blob = blob
        self._offsets = offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringTable:
        # surrogateescape: a file name that is not UTF-8 (Linux hands it over with surrogates)
        # round-trips to the same bytes, so it still opens the same file.
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].decode("utf-8", "surrogateescape")

    def take(self, indices: np.ndarray) -> StringTable:
        """A new table of the entries at ``indices``, in that order."""
        return StringTable.from_strings(self[int(i)] for i in indices)

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes

    def __getstate__(self) -> tuple[bytes, np.ndarray]:
        return self._blob, self._offsets

    def __setstate__(self, state: tuple[bytes, np.ndarray]) -> None:
        self._blob, self._offsets = state


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """Per-image data of one or more datasets, columnar.

    Attributes:
        paths: image file paths.
        captions: raw caption text (before caption rules), ``""`` when none.
        conditioning: conditioning image path per image (``""`` when none).
        widths, heights: image size after EXIF orientation (int32).
        subset: index of the image's subset in ``subsets`` (int32).
        subsets: the subset configs, in scan order.
        dataset_of_subset: for each subset, the index of its dataset.
    """

    paths: StringTable
    captions: StringTable
    conditioning: StringTable
    widths: np.ndarray
    heights: np.ndarray
    subset: np.ndarray
    subsets: tuple[SubsetConfig, ...]
    dataset_of_subset: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.widths)

    def select(self, keep: np.ndarray) -> Catalog:
        """The catalog restricted to the images at the indices in ``keep`` (in that order)."""
        return Catalog(
            paths=self.paths.take(keep),
            captions=self.captions.take(keep),
            conditioning=self.conditioning.take(keep),
            widths=self.widths[keep],
            heights=self.heights[keep],
            subset=self.subset[keep],
            subsets=self.subsets,
            dataset_of_subset=self.dataset_of_subset,
        )


@dataclass
class _Rows:
    """Scan results collected row by row before packing into a Catalog."""

    paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    conditioning: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    subset: list[int] = field(default_factory=list)


def scan_dataset(
    datasets: Sequence[DatasetConfig],
    *,
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Catalog, list[Problem]]:
    """Scan every subset of ``datasets``: files, captions, header sizes.

    Args:
        datasets: the dataset configs, as parsed.
        threads: parallel header reads (the CPU budget is a good value).
        progress: called as ``progress(done, total)`` while reading sizes.

    Returns:
        The catalog of usable images and the problems found (files skipped, captions replaced).

    Raises:
        DatasetError: an image_dir, metadata file or conditioning folder does not exist.
    """
    rows, problems = _Rows(), list[Problem]()
    subsets: list[SubsetConfig] = []
    owners: list[int] = []
    pending: list[tuple[int, Path]] = []  # (row, path) whose size must be read
    for d, dataset in enumerate(datasets):
        for subset in dataset.subsets:
            index = len(subsets)
            subsets.append(subset)
            owners.append(d)
            _scan_subset(subset, index, rows, problems, pending)
    sizes = _read_sizes(rows, pending, subsets, threads, progress, problems)
    keep = np.flatnonzero(sizes[:, 0] > 0)
    catalog = Catalog(
        paths=StringTable.from_strings(rows.paths[i] for i in keep),
        captions=StringTable.from_strings(rows.captions[i] for i in keep),
        conditioning=StringTable.from_strings(rows.conditioning[i] for i in keep),
        widths=sizes[keep, 0].astype(np.int32),
        heights=sizes[keep, 1].astype(np.int32),
        subset=np.asarray(rows.subset, dtype=np.int32)[keep],
        subsets=tuple(subsets),
        dataset_of_subset=tuple(owners),
    )
    return catalog, problems


def _scan_subset(
    subset: SubsetConfig,
    index: int,
    rows: _Rows,
    problems: list[Problem],
    pending: list[tuple[int, Path]],
) -> None:
    if subset.metadata_file is not None:
        entries = _metadata_entries(subset, problems)
    else:
        entries = [(p, None, None) for p in _list_images(subset)]
    cond_dir = _checked_dir(subset.conditioning_data_dir, subset, "conditioning_data_dir")
    cond_index = _index_by_stem(cond_dir) if cond_dir is not None else {}
    for path, caption, size in entries:
        if caption is None:
            caption = _read_caption(path, subset, problems)
        conditioning = ""
        if cond_dir is not None:
            match = cond_index.get(path.stem)
            if match is None:
                problems.append(
                    Problem(
                        path=str(path),
                        reason=(f"no conditioning image named {path.stem}.* in {cond_dir}"),
                    )
                )
                continue
            conditioning = str(match)
        row = len(rows.paths)
        rows.paths.append(str(path))
        rows.captions.append(caption)
        rows.conditioning.append(conditioning)
        rows.subset.append(index)
        rows.sizes.append(size if size is not None else (0, 0))
        if size is None:
            pending.append((row, path))


def _checked_dir(folder: Path | None, subset: SubsetConfig, key: str) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise DatasetError(
            f"{subset.where}: {key} '{folder}' does not exist or is not a folder; "
            "fix the path in the config (relative paths are resolved from the config's folder)"
        )
    return folder


def _list_images(subset: SubsetConfig) -> list[Path]:
    folder = _checked_dir(subset.image_dir, subset, "image_dir")
    if folder is None:
        raise DatasetError(f"{subset.where}: a subset needs image_dir or metadata_file")
    extensions = image_extensions()
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and _has_ext(e.name, extensions))
    return [folder / name for name in names]


def _has_ext(name: str, extensions: tuple[str, ...]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _index_by_stem(folder: Path) -> dict[str, Path]:
    extensions = image_extensions()
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and _has_ext(path.name, extensions):
            found.setdefault(path.stem, path)
    return found


def _read_caption(image: Path, subset: SubsetConfig, problems: list[Problem]) -> str:
    """The caption file's text, or the class tokens when it is missing, empty or unreadable."""
    fallback = subset.class_tokens or ""
    file = image.with_name(image.stem + subset.caption_extension)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        if not fallback:
            problems.append(
                Problem(
                    path=str(image),
                    reason=(f"no caption file {file.name} and no class_tokens"),
                    action="used empty caption",
                )
            )
        return fallback
    except OSError as err:
        problems.append(
            Problem(
                path=str(file),
                reason=f"caption unreadable: {err.strerror}",
                action="used class tokens",
            )
        )
        return fallback
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append(
            Problem(path=str(file), reason="caption is not UTF-8", action="used class tokens")
        )
        return fallback
    return _caption_text(text, file, fallback, problems)


def _caption_text(text: str, file: Path, fallback: str, problems: list[Problem]) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        problems.append(
            Problem(path=str(file), reason="caption file is empty", action="used class tokens")
        )
        return fallback
    # Lines stay: caption rules pick one (wildcard mode) or keep the first, as sd-scripts does.
    return "\n".join(lines)


def _metadata_entries(
    subset: SubsetConfig, problems: list[Problem]
) -> list[tuple[Path, str | None, tuple[int, int] | None]]:
    assert subset.metadata_file is not None
    metadata = load_metadata(subset.metadata_file)
    extensions = image_extensions()
    entries = []
    for key, info in metadata.items():
        path = _metadata_image(key, subset.image_dir, extensions)
        if path is None:
            problems.append(
                Problem(
                    path=key,
                    reason=(f"listed in {subset.metadata_file.name} but no image file was found"),
                )
            )
            continue
        caption, tags = info.get("caption"), info.get("tags")
        if caption is None:
            caption = tags
        elif tags:
            caption = f"{caption}, {tags}"
        size = info.get("image_size")
        size_wh = (
            (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None
        )
        entries.append(
            (path, caption if caption is not None else subset.class_tokens or "", size_wh)
        )
    return entries


def _metadata_image(key: str, image_dir: Path | None, extensions: tuple[str, ...]) -> Path | None:
    direct = Path(key)
    if direct.is_absolute() and direct.is_file():
        return direct
    base = image_dir if image_dir is not None else Path.cwd()
    candidate = base / key
    if candidate.suffix.lower() in extensions and candidate.is_file():
        return candidate
    for ext in extensions:
        for variant in (ext, ext.upper()):
            path = base / (key + variant)
            if path.is_file():
                return path
    return None


# --- sizes, in parallel, with the scan cache -------------------------------------------------


def _read_sizes(
    rows: _Rows,
    pending: list[tuple[int, Path]],
    subsets: list[SubsetConfig],
    threads: int,
    progress: Callable[[int, int], None] | None,
    problems: list[Problem],
) -> np.ndarray:
    sizes = np.asarray(rows.sizes, dtype=np.int64).reshape(-1, 2)
    caches = _ScanCaches()
    todo: list[tuple[int, Path, os.stat_result | None]] = []
    for row, path in pending:
        subset = subsets[rows.subset[row]]
        stat = _stat(path)
        hit = caches.get(path, stat) if subset.cache_info and stat is not None else None
        if hit is not None:
            sizes[row] = hit
        else:
            todo.append((row, path, stat))
    results = _parallel_sizes([p for _, p, _ in todo], threads, progress)
    for (row, path, stat), result in zip(todo, results, strict=True):
        if isinstance(result, str):
            problems.append(Problem(path=str(path), reason=result))
            sizes[row] = (0, 0)
            continue
        sizes[row] = result
        if subsets[rows.subset[row]].cache_info and stat is not None:
            caches.put(path, stat, result)
    caches.save()
    return sizes


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _size_or_reason(path: Path) -> tuple[int, int] | str:
    try:
        return read_image_size(path)
    except ImageProblem as err:
        return err.reason


def _parallel_sizes(
    paths: list[Path], threads: int, progress: Callable[[int, int], None] | None
) -> list[tuple[int, int] | str]:
    """Header sizes for ``paths``; threads overlap the file reads (parsing holds the GIL briefly)."""
    total = len(paths)
    if total == 0:
        return []
    if threads <= 1 or total < 64:
        results = []
        for i, path in enumerate(paths):
            results.append(_size_or_reason(path))
            if progress is not None and (i + 1) % 256 == 0:
                progress(i + 1, total)
    else:
        results = []
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for i, result in enumerate(pool.map(_size_or_reason, paths, chunksize=64)):
                results.append(result)
                if progress is not None and (i + 1) % 256 == 0:
                    progress(i + 1, total)
    if progress is not None:
        progress(total, total)
    return results


class _ScanCaches:
    """One JSON cache file per image folder: name -> [size_bytes, mtime_ns, width, height].

    An entry counts only while the file's size and mtime are unchanged. Files are written to a
    temporary name and renamed, so an interrupted scan never leaves a half-written cache.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, list[int]]] = {}
        self._dirty: set[Path] = set()

    def _load(self, folder: Path) -> dict[str, list[int]]:
        if folder not in self._folders:
            try:
                data = json.loads((folder / SCAN_CACHE_NAME).read_text(encoding="utf-8"))
                entries = data["entries"] if data.get("version") == _CACHE_VERSION else {}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                entries = {}
            self._folders[folder] = entries if isinstance(entries, dict) else {}
        return self._folders[folder]

    def get(self, path: Path, stat: os.stat_result) -> tuple[int, int] | None:
        entry = self._load(path.parent).get(path.name)
        if (
            isinstance(entry, list)
            and len(entry) == 4
            and entry[0] == stat.st_size
            and entry[1] == stat.st_mtime_ns
        ):
            return int(entry[2]), int(entry[3])
        return None

    def put(self, path: Path, stat: os.stat_result, size: tuple[int, int]) -> None:
        self._load(path.parent)[path.name] = [stat.st_size, stat.st_mtime_ns, size[0], size[1]]
        self._dirty.add(path.parent)

    def save(self) -> None:
        for folder in self._dirty:
            target = folder / SCAN_CACHE_NAME
            text = json.dumps({"version": _CACHE_VERSION, "entries": self._folders[folder]})
            # A read-only dataset folder just means no cache: the scan result stands.
            with contextlib.suppress(OSError):
                atomic_write_text(target, text)


def stderr_progress(label: str) -> Callable[[int, int], None] | None:
    """A progress callback that draws on stderr, or ``None`` when stderr is not a terminal."""
    return progress_bar(label, unit="images")
