"""Scan a dataset once: image files, captions and header sizes, held in arrays that fork cheaply.

A catalog keeps per-image data in NumPy arrays and packed string tables rather than one Python
object per image: a forked worker that reads entry 900,000 touches a few pages of a byte blob
instead of bumping the reference counts of a million dicts (which copies them page by page), and
a spawned worker unpickles a handful of buffers.

Problems never stop a scan: each bad file becomes a ``Problem`` (kind, subset, path, reason) in
the report, and the caller's ``on_error`` policy decides what to do with the list. Paths stay
inside their roots: a symlink or metadata key that leads out of the image folder is reported and
skipped, never followed (see ``stoker.data.inputs``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from stoker.data.config import DatasetConfig, SubsetConfig, load_metadata
from stoker.data.images import ImageProblem, read_image_size
from stoker.data.inputs import (
    CAPTION_LIMIT_BYTES,
    UnusableFile,
    inside,
    lexically_inside,
    os_reason,
    read_bounded,
)
from stoker.errors import DatasetError, Problem, ProblemKind
from stoker.files import atomic_write_text
from stoker.progress import progress_bar
from stoker.warn import warn

__all__ = ["Catalog", "Problem", "StringTable", "scan_dataset", "image_extensions"]

_BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SCAN_CACHE_NAME = ".stoker-scan-cache.json"
_CACHE_VERSION = 2
_CACHE_LIMIT_BYTES = 1 << 30


def image_extensions() -> tuple[str, ...]:
    """Extensions scanned (lower case): png jpg jpeg webp bmp, plus avif/jxl when Pillow can read them."""
    from PIL import Image

    registered = Image.registered_extensions()
    extra = tuple(ext for ext in (".avif", ".jxl") if ext in registered)
    return _BASE_EXTENSIONS + extra


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
        items = strings if isinstance(strings, list) else list(strings)
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        joined = "".join(items)
        blob = joined.encode("utf-8", "surrogateescape")
        if len(blob) == len(joined):  # all ASCII, the usual case: bytes = characters
            np.cumsum(np.fromiter(map(len, items), np.int64, len(items)), out=offsets[1:])
            return cls(blob, offsets)
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].decode("utf-8", "surrogateescape")

    def take(self, indices: np.ndarray) -> StringTable:
        """A new table of the entries at ``indices``, in that order (bytes copied, not decoded)."""
        starts = self._offsets[:-1][indices].tolist()
        ends = self._offsets[1:][indices].tolist()
        blob = self._blob
        offsets = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(np.asarray(ends, np.int64) - np.asarray(starts, np.int64), out=offsets[1:])
        return StringTable(
            b"".join([blob[a:b] for a, b in zip(starts, ends, strict=True)]), offsets
        )

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

    def fingerprint(self) -> str:
        """A digest of which files, of which sizes, in which subsets: the dataset's identity."""
        digest = hashlib.blake2b(digest_size=16)
        for table in (self.paths, self.conditioning):
            blob, offsets = table.__getstate__()
            digest.update(blob)
            digest.update(np.asarray(offsets, "<i8").tobytes())
        for array in (self.widths, self.heights, self.subset):
            digest.update(np.asarray(array, "<i8").tobytes())
        return digest.hexdigest()

    def select(self, keep: np.ndarray) -> Catalog:
        """The catalog restricted to the images at the indices in ``keep`` (in that order)."""
        if len(keep) == len(self) and np.array_equal(keep, np.arange(len(self))):
            return self  # arrays are never changed in place, so sharing is safe
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
    pending: list[tuple[int, str]] = []  # (row, path) whose size must be read
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
    pending: list[tuple[int, str]],
) -> None:
    if subset.metadata_file is not None:
        entries = _metadata_entries(subset, index, problems)
    else:
        entries = [(p, None, None) for p in _list_images(subset, index, problems)]
    cond_dir = _checked_dir(subset.conditioning_data_dir, subset, "conditioning_data_dir")
    cond_index = _index_by_stem(cond_dir, subset, index, problems) if cond_dir is not None else {}
    for path, caption, size in entries:
        if caption is None:
            caption = _read_caption(Path(path), subset, index, problems)
        conditioning = ""
        if cond_dir is not None:
            stem = os.path.splitext(os.path.basename(path))[0]
            match = cond_index.get(stem)
            if match is None:
                problems.append(
                    Problem(
                        path=path,
                        reason=f"no conditioning image named {stem}.* in {cond_dir}",
                        kind="no_conditioning",
                        subset=index,
                    )
                )
                continue
            conditioning = str(match)
        row = len(rows.paths)
        rows.paths.append(path)
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


def _list_images(subset: SubsetConfig, index: int, problems: list[Problem]) -> list[str]:
    folder = _checked_dir(subset.image_dir, subset, "image_dir")
    if folder is None:
        raise DatasetError(f"{subset.where}: a subset needs image_dir or metadata_file")
    found = _image_files(folder, subset, index, problems)
    return [str(folder / name) for name in sorted(found)]


def _image_files(
    folder: Path, subset: SubsetConfig, index: int, problems: list[Problem]
) -> list[str]:
    """Names of the usable image files in ``folder``; symlinks out of it and non-files reported."""
    extensions = image_extensions()
    root = os.path.realpath(folder)
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if _has_ext(e.name, extensions)]
    except OSError as err:
        raise DatasetError(
            f"{subset.where}: cannot list the folder '{folder}': {os_reason(err)}; "
            "make it readable (chmod) or take it out of the dataset"
        ) from None
    names = []
    for entry in entries:
        path = os.path.join(folder, entry.name)
        found = _entry_problem(entry, root)
        if found == "file":
            names.append(entry.name)
        elif found != "folder":
            kind, reason = found
            problems.append(Problem(path=path, reason=reason, kind=kind, subset=index))
    return names


def _entry_problem(
    entry: os.DirEntry[str], root: str
) -> tuple[ProblemKind, str] | Literal["file", "folder"]:
    """``"file"`` when usable, ``"folder"`` (silently not an image), else the problem."""
    try:
        if entry.is_symlink():
            problem = symlink_problem(entry.path, root)
            if problem is not None:
                return problem
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "folder"
        return "not_regular_file", "not a regular file (FIFO, device or socket)"
    except OSError as err:
        return "missing_image", f"cannot be read: {os_reason(err)}"


def symlink_problem(path: str, root: str) -> tuple[ProblemKind, str] | None:
    """Why the symlink at ``path`` must not be followed (dangling, a loop, out of ``root``), or None."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == 2:
            return "missing_image", "dangling symlink: its target does not exist"
        return "missing_image", f"symlink cannot be followed: {os_reason(err)}"
    if not inside(path, root):
        return (
            "outside_root",
            f"symlink leads outside the dataset folder {root} (to {os.path.realpath(path)}); "
            "copy the file in, or point image_dir at the folder that holds it",
        )
    return None


def _has_ext(name: str, extensions: tuple[str, ...]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _index_by_stem(
    folder: Path, subset: SubsetConfig, index: int, problems: list[Problem]
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in sorted(_image_files(folder, subset, index, problems)):
        found.setdefault(os.path.splitext(name)[0], folder / name)
    return found


def _read_caption(image: Path, subset: SubsetConfig, index: int, problems: list[Problem]) -> str:
    """The caption file's text, or the class tokens when it is missing, empty or unusable."""
    fallback = subset.class_tokens or ""
    file = image.with_name(image.stem + subset.caption_extension)

    def problem(reason: str, kind: ProblemKind = "bad_caption") -> str:
        action = "used class tokens" if fallback else "used empty caption"
        problems.append(
            Problem(path=str(file), reason=reason, kind=kind, subset=index, action=action)
        )
        return fallback

    try:
        if os.path.islink(file):
            link = symlink_problem(str(file), os.path.realpath(image.parent))
            if link is not None and link[0] == "outside_root":
                return problem(f"caption {link[1]}", "outside_root")
        raw = read_bounded(file, CAPTION_LIMIT_BYTES)
    except FileNotFoundError:
        if not fallback:
            problems.append(
                Problem(
                    path=str(image),
                    reason=f"no caption file {file.name} and no class_tokens",
                    kind="missing_caption",
                    subset=index,
                    action="used empty caption",
                )
            )
        return fallback
    except UnusableFile as err:
        return problem(f"caption file {err.reason}")
    except OSError as err:
        return problem(f"caption unreadable: {os_reason(err)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return problem("caption is not UTF-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return problem("caption file is empty")
    # Lines stay: caption rules pick one (wildcard mode) or keep the first, as sd-scripts does.
    return "\n".join(lines)


def _metadata_entries(
    subset: SubsetConfig, index: int, problems: list[Problem]
) -> list[tuple[str, str | None, tuple[int, int] | None]]:
    assert subset.metadata_file is not None
    metadata = load_metadata(subset.metadata_file)
    finder = _KeyFinder(subset.image_dir if subset.image_dir is not None else Path.cwd())
    entries = []
    for key, info in metadata.items():
        path, why = finder.find(key)
        if path is None:
            kind, reason = why or (
                "missing_image",
                f"listed in {subset.metadata_file.name} but no image file was found",
            )
            problems.append(Problem(path=key, reason=reason, kind=kind, subset=index))
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


class _KeyFinder:
    """Metadata keys to image files, by one listing per folder instead of stats per key.

    A key is a path relative to the base (``image_dir``), with or without its extension, or an
    absolute path (the user's explicit choice). A relative key that climbs out of the base
    (``../x``), a key with a NUL byte, or a symlink leading out of the base is refused.
    """

    def __init__(self, base: Path) -> None:
        self.base = os.path.abspath(base)
        self.root = os.path.realpath(base)
        self.extensions = image_extensions()
        # A key without extension matches <key><ext> in this order, as sd-scripts tries them.
        variants = [v for ext in self.extensions for v in (ext, ext.upper())]
        self._rank = {ext: i for i, ext in enumerate(variants)}
        self._folders: dict[str, _Listing] = {}

    def _listing(self, folder: str) -> _Listing:
        listing = self._folders.get(folder)
        if listing is None:
            listing = _Listing()
            try:
                with os.scandir(folder) as it:
                    for entry in it:
                        listing.add(entry.name, entry.is_symlink(), self._rank)
            except OSError:
                pass  # a missing or unreadable folder holds no images: each key is reported
            self._folders[folder] = listing
        return listing

    def find(self, key: str) -> tuple[str | None, tuple[ProblemKind, str] | None]:
        if "\0" in key:
            return None, ("missing_image", "image key holds a NUL byte")
        absolute = os.path.isabs(key)
        if not absolute and "/" not in key and key not in (".", ".."):
            folder, name = self.base, key  # the common case: a plain name in image_dir
        else:
            joined = os.path.normpath(key if absolute else os.path.join(self.base, key))
            if not absolute and not lexically_inside(joined, self.base):
                return None, (
                    "outside_root",
                    f"image key leads outside image_dir {self.base}; keys are relative to image_dir",
                )
            folder, name = os.path.split(joined)
        listing = self._listing(folder)
        found = name if name in listing.symlinks else None
        found = found or listing.by_stem.get(name, (None, 0))[0]
        if found is None:
            return None, None
        path = os.path.join(folder, found)
        if listing.symlinks[found]:
            problem = symlink_problem(path, folder if absolute else self.root)
            if problem is not None:
                return None, problem
        return path, None


class _Listing:
    """One folder's image files: name -> is_symlink, and stem -> the name sd-scripts would pick."""

    __slots__ = ("by_stem", "symlinks")

    def __init__(self) -> None:
        self.symlinks: dict[str, bool] = {}
        self.by_stem: dict[str, tuple[str, int]] = {}

    def add(self, name: str, is_symlink: bool, rank: dict[str, int]) -> None:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in rank:
            return
        self.symlinks[name] = is_symlink
        order = rank.get(ext, len(rank))  # .Jpg matches a key with its extension only
        best = self.by_stem.get(stem)
        if order < len(rank) and (best is None or order < best[1]):
            self.by_stem[stem] = (name, order)


# --- sizes, in parallel, with the scan cache -------------------------------------------------


def _read_sizes(
    rows: _Rows,
    pending: list[tuple[int, str]],
    subsets: list[SubsetConfig],
    threads: int,
    progress: Callable[[int, int], None] | None,
    problems: list[Problem],
) -> np.ndarray:
    sizes = np.asarray(rows.sizes, dtype=np.int64).reshape(-1, 2)
    caches = _ScanCaches()
    todo: list[tuple[int, str, os.stat_result | None]] = []
    for row, path in pending:
        # Only a cached subset needs the stat (a million stat results would cost 200 MB).
        stat = _stat(path) if subsets[rows.subset[row]].cache_info else None
        hit = caches.get(path, stat) if stat is not None else None
        if hit is not None:
            sizes[row] = hit
        else:
            todo.append((row, path, stat))
    results = _parallel_sizes([p for _, p, _ in todo], threads, progress)
    for (row, path, stat), result in zip(todo, results, strict=True):
        if isinstance(result, str):
            problems.append(Problem(path=path, reason=result, subset=rows.subset[row]))
            sizes[row] = (0, 0)
            continue
        sizes[row] = result
        if subsets[rows.subset[row]].cache_info and stat is not None:
            caches.put(path, stat, result)
    caches.save()
    return sizes


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _size_or_reason(path: str) -> tuple[int, int] | str:
    try:
        return read_image_size(path)
    except ImageProblem as err:
        return err.reason


def _parallel_sizes(
    paths: list[str], threads: int, progress: Callable[[int, int], None] | None
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


def _stat_key(stat: os.stat_result) -> list[int]:
    """What must match for a cached size to count: size, mtime, ctime and inode.

    ctime cannot be set by a user (``touch -d`` and ``os.utime`` set mtime only), and a rewrite by
    rename changes the inode, so a file rewritten with the same size and mtime is still noticed.
    """
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 6
        and all(type(v) is int for v in entry)
        and entry[4] > 0
        and entry[5] > 0
    )


class _ScanCaches:
    """One JSON cache file per image folder: name -> [size, mtime_ns, ctime_ns, inode, width, height].

    An entry counts only while size, mtime, ctime and inode are unchanged. A cache of an older
    version is rebuilt silently; one that is unreadable or has entries of the wrong shape is
    ignored and rebuilt with one warning. Files are written by ``stoker.files.atomic_write_text``
    (never through a symlink); a folder that cannot be written is said once, and the scan stands.
    """

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, list[int]]] = {}
        self._dirty: set[str] = set()

    def _load(self, folder: str) -> dict[str, list[int]]:
        if folder not in self._folders:
            entries, why = _read_cache(os.path.join(folder, SCAN_CACHE_NAME))
            if why is not None:
                warn(
                    f"ignored the scan cache {os.path.join(folder, SCAN_CACHE_NAME)} ({why}); "
                    "it is rebuilt from the image headers",
                    once=False,
                )
                self._dirty.add(folder)
            self._folders[folder] = entries
        return self._folders[folder]

    def get(self, path: str, stat: os.stat_result) -> tuple[int, int] | None:
        folder, name = os.path.split(path)
        entry = self._load(folder).get(name)
        if entry is not None and entry[:4] == _stat_key(stat):
            return entry[4], entry[5]
        return None

    def put(self, path: str, stat: os.stat_result, size: tuple[int, int]) -> None:
        folder, name = os.path.split(path)
        self._load(folder)[name] = [*_stat_key(stat), int(size[0]), int(size[1])]
        self._dirty.add(folder)

    def save(self) -> None:
        for folder in sorted(self._dirty):
            target = os.path.join(folder, SCAN_CACHE_NAME)
            text = json.dumps({"version": _CACHE_VERSION, "entries": self._folders[folder]})
            try:
                atomic_write_text(target, text)
            except OSError as err:
                warn(
                    f"could not write the scan cache {target} ({os_reason(err)}); the scan is "
                    "complete, but the next one reads every header again (set cache_info = false "
                    "to stop trying)",
                    once=False,
                )


def _read_cache(file: str) -> tuple[dict[str, list[int]], str | None]:
    """The valid entries of a scan cache file and, when it was corrupt, why (None: fine or absent)."""
    try:
        if os.path.islink(file):
            return {}, "it is a symlink; stoker never reads or writes through one"
        data = json.loads(read_bounded(file, _CACHE_LIMIT_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return {}, None
    except UnusableFile as err:
        return {}, err.reason
    except OSError as err:
        return {}, os_reason(err)
    except (ValueError, RecursionError):
        return {}, "not valid JSON"
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, "not a scan cache object"
    if data.get("version") != _CACHE_VERSION:
        return {}, None  # an older stoker's cache: rebuilt without a word
    entries = data["entries"]
    good = {k: v for k, v in entries.items() if isinstance(k, str) and _valid_entry(v)}
    bad = len(entries) - len(good)
    return good, (f"{bad} entries of the wrong shape" if bad else None)


def stderr_progress(label: str) -> Callable[[int, int], None] | None:
    """A progress callback that draws on stderr, or ``None`` when stderr is not a terminal."""
    return progress_bar(label, unit="images")
