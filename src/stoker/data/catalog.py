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

import array
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
        for column in (self.widths, self.heights, self.subset):
            digest.update(np.asarray(column, "<i8").tobytes())
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
    """Scan results collected row by row before packing into a Catalog.

    Sizes and subset indices go into typed arrays (8 bytes a number, no tuple per row); a width
    of 0 marks a size still to be read from the header.
    """

    paths: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    conditioning: list[str] = field(default_factory=list)
    widths: array.array[int] = field(default_factory=lambda: array.array("q"))
    heights: array.array[int] = field(default_factory=lambda: array.array("q"))
    subset: array.array[int] = field(default_factory=lambda: array.array("i"))


def scan_dataset(
    datasets: Sequence[DatasetConfig],
    *,
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
    links_outside: bool = False,
) -> tuple[Catalog, list[Problem]]:
    """Scan every subset of ``datasets``: files, captions, header sizes.

    Args:
        datasets: the dataset configs, as parsed.
        threads: parallel header reads (the CPU budget is a good value).
        progress: called as ``progress(done, total)`` while reading sizes.
        links_outside: follow symlinks and metadata keys that lead out of their folder (a
            symlink farm) instead of reporting them as ``outside_root``.

    Returns:
        The catalog of usable images and the problems found (files skipped, captions replaced).

    Raises:
        DatasetError: an image_dir, metadata file or conditioning folder does not exist.
    """
    rows, problems = _Rows(), list[Problem]()
    subsets: list[SubsetConfig] = []
    owners: list[int] = []
    for d, dataset in enumerate(datasets):
        for subset in dataset.subsets:
            index = len(subsets)
            subsets.append(subset)
            owners.append(d)
            _scan_subset(subset, index, rows, problems, links_outside)
    sizes = _read_sizes(rows, subsets, threads, progress, problems)
    keep = np.flatnonzero(sizes[:, 0] > 0)
    everything = len(keep) == len(rows.paths)

    def table(strings: list[str]) -> StringTable:
        return StringTable.from_strings(strings if everything else [strings[i] for i in keep])

    catalog = Catalog(
        paths=table(rows.paths),
        captions=table(rows.captions),
        conditioning=table(rows.conditioning),
        widths=sizes[keep, 0].astype(np.int32),
        heights=sizes[keep, 1].astype(np.int32),
        subset=np.frombuffer(rows.subset, dtype=np.int32)[keep],
        subsets=tuple(subsets),
        dataset_of_subset=tuple(owners),
    )
    return catalog, problems


def _scan_subset(
    subset: SubsetConfig,
    index: int,
    rows: _Rows,
    problems: list[Problem],
    links_outside: bool,
) -> None:
    entries: Iterable[tuple[str, str | None, tuple[int, int] | None]]
    if subset.metadata_file is not None:
        metadata = load_metadata(subset.metadata_file)
        entries = _metadata_entries(subset, index, problems, metadata, links_outside)
        if subset.conditioning_data_dir is not None:
            entries = list(entries)  # its problems first, as ever, then the conditioning ones
    else:
        entries = [(p, None, None) for p in _list_images(subset, index, problems, links_outside)]
    cond_dir = _checked_dir(subset.conditioning_data_dir, subset, "conditioning_data_dir")
    cond_index = (
        _index_by_stem(cond_dir, subset, index, problems, links_outside)
        if cond_dir is not None
        else {}
    )
    for path, caption, size in entries:
        if caption is None:
            caption = _read_caption(Path(path), subset, index, problems, links_outside)
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
        rows.paths.append(path)
        rows.captions.append(caption)
        rows.conditioning.append(conditioning)
        rows.subset.append(index)
        rows.widths.append(size[0] if size is not None else 0)
        rows.heights.append(size[1] if size is not None else 0)


def _checked_dir(folder: Path | None, subset: SubsetConfig, key: str) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise DatasetError(
            f"{subset.where}: {key} '{folder}' does not exist or is not a folder; "
            "fix the path in the config (relative paths are resolved from the config's folder)"
        )
    return folder


def _list_images(
    subset: SubsetConfig, index: int, problems: list[Problem], links_outside: bool
) -> list[str]:
    folder = _checked_dir(subset.image_dir, subset, "image_dir")
    if folder is None:
        raise DatasetError(f"{subset.where}: a subset needs image_dir or metadata_file")
    found = _image_files(folder, subset, index, problems, links_outside)
    return [str(folder / name) for name in sorted(found)]


def _image_files(
    folder: Path, subset: SubsetConfig, index: int, problems: list[Problem], links_outside: bool
) -> list[str]:
    """Names of the usable image files in ``folder``; symlinks out of it and non-files reported."""
    extensions = image_extensions()
    root = None if links_outside else os.path.realpath(folder)
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
    entry: os.DirEntry[str], root: str | None
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


def symlink_problem(path: str, root: str | None) -> tuple[ProblemKind, str] | None:
    """Why the symlink at ``path`` must not be followed (dangling, a loop, out of ``root``), or None.

    ``root`` None: the user let links lead anywhere (``links_outside``).
    """
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == 2:
            return "missing_image", "dangling symlink: its target does not exist"
        return "missing_image", f"symlink cannot be followed: {os_reason(err)}"
    if root is not None and not inside(path, root):
        return (
            "outside_root",
            f"symlink leads outside the dataset folder {root} (to {os.path.realpath(path)}); "
            "copy the file in, point image_dir at the folder that holds it, or opt in to "
            "following such links (load_dataset links_outside=True, --links-outside)",
        )
    return None


def _has_ext(name: str, extensions: tuple[str, ...]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def _index_by_stem(
    folder: Path, subset: SubsetConfig, index: int, problems: list[Problem], links_outside: bool
) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in sorted(_image_files(folder, subset, index, problems, links_outside)):
        found.setdefault(os.path.splitext(name)[0], folder / name)
    return found


def _read_caption(
    image: Path, subset: SubsetConfig, index: int, problems: list[Problem], links_outside: bool
) -> str:
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
        if os.path.islink(file) and not links_outside:
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
    subset: SubsetConfig,
    index: int,
    problems: list[Problem],
    metadata: dict[str, dict[str, Any]],
    links_outside: bool,
) -> Iterator[tuple[str, str | None, tuple[int, int] | None]]:
    """``(path, caption, size or None)`` per metadata entry whose image is found, in file order.

    Each entry is taken out of the parsed metadata as it is used, so a million parsed entries
    and a million rows are never all held at once.
    """
    assert subset.metadata_file is not None
    base = subset.image_dir if subset.image_dir is not None else Path.cwd()
    finder = _KeyFinder(base, links_outside)
    plain = finder.plain_names()
    fallback = subset.class_tokens or ""
    for key in list(metadata):
        info = metadata.pop(key)
        path = plain(key)
        if path is None:
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
        yield path, caption if caption is not None else fallback, size_wh


class _KeyFinder:
    """Metadata keys to image files, by one listing per folder instead of stats per key.

    A key is a path relative to the base (``image_dir``), with or without its extension, or an
    absolute path (the user's explicit choice). A relative key that climbs out of the base
    (``../x``), a key with a NUL byte, or a symlink leading out of the base is refused, unless
    ``links_outside`` (then only the NUL byte is).
    """

    def __init__(self, base: Path, links_outside: bool = False) -> None:
        self.base = os.path.abspath(base)
        self.root = os.path.realpath(base)
        self.links_outside = links_outside
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
                    listing.add_all(it, self._rank)
            except OSError:
                pass  # a missing or unreadable folder holds no images: each key is reported
            self._folders[folder] = listing
        return listing

    def plain_names(self) -> Callable[[str], str | None]:
        """A quick `find` for the common key: a plain name in the base folder that is no symlink.

        The function returns the path, or None when the key needs `find` (another folder, a
        symlink, a missing file, a NUL byte), which then gives the same answer or the reason.
        """
        listing = self._listing(self.base)
        symlinks, by_stem = listing.symlinks, listing.by_stem
        prefix = os.path.join(self.base, "")
        nothing = (None, 0)

        def plain(key: str) -> str | None:
            if "/" in key or "\0" in key or key in (".", ".."):
                return None
            found = key if key in symlinks else by_stem.get(key, nothing)[0]
            if found is None or symlinks[found]:
                return None
            return prefix + found

        return plain

    def find(self, key: str) -> tuple[str | None, tuple[ProblemKind, str] | None]:
        if "\0" in key:
            return None, ("missing_image", "image key holds a NUL byte")
        absolute = os.path.isabs(key)
        if not absolute and "/" not in key and key not in (".", ".."):
            folder, name = self.base, key  # the common case: a plain name in image_dir
        else:
            joined = os.path.normpath(key if absolute else os.path.join(self.base, key))
            if not (absolute or self.links_outside or lexically_inside(joined, self.base)):
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
            root = None if self.links_outside else folder if absolute else self.root
            problem = symlink_problem(path, root)
            if problem is not None:
                return None, problem
        return path, None


class _Listing:
    """One folder's image files: name -> is_symlink, and stem -> the name sd-scripts would pick."""

    __slots__ = ("by_stem", "symlinks")

    def __init__(self) -> None:
        self.symlinks: dict[str, bool] = {}
        self.by_stem: dict[str, tuple[str, int]] = {}

    def add_all(self, entries: Iterable[os.DirEntry[str]], rank: dict[str, int]) -> None:
        """Take in a folder's entries (one pass, no stat: ``is_symlink`` comes from the listing)."""
        symlinks, by_stem, known = self.symlinks, self.by_stem, len(rank)
        for entry in entries:
            name = entry.name
            dot = name.rfind(".")
            if dot <= 0 or name[dot:].lower() not in rank or not name[:dot].lstrip("."):
                continue  # no extension (as os.path.splitext sees it) or not an image's
            stem, ext = name[:dot], name[dot:]
            symlinks[name] = entry.is_symlink()
            order = rank.get(ext, known)  # .Jpg matches a key with its extension only
            best = by_stem.get(stem)
            if order < known and (best is None or order < best[1]):
                by_stem[stem] = (name, order)


# --- sizes, in parallel, with the scan cache -------------------------------------------------


def _read_sizes(
    rows: _Rows,
    subsets: list[SubsetConfig],
    threads: int,
    progress: Callable[[int, int], None] | None,
    problems: list[Problem],
) -> np.ndarray:
    """Every row's ``(width, height)`` as an ``(n, 2)`` array: given, cached, or read; 0 = unusable."""
    sizes = np.empty((len(rows.paths), 2), dtype=np.int64)
    sizes[:, 0] = np.frombuffer(rows.widths, dtype=np.int64)
    sizes[:, 1] = np.frombuffer(rows.heights, dtype=np.int64)
    cached_subsets = {i for i, subset in enumerate(subsets) if subset.cache_info}
    caches = _ScanCaches()
    todo = np.flatnonzero(sizes[:, 0] == 0)
    stats: dict[int, os.stat_result] = {}
    if cached_subsets:
        # Only a cached subset needs the stat (a million stat results would cost 200 MB).
        misses = []
        for row in todo.tolist():
            if rows.subset[row] not in cached_subsets:
                misses.append(row)
                continue
            path = rows.paths[row]
            stat = _stat(path)
            hit = caches.get(path, stat) if stat is not None else None
            if hit is not None:
                sizes[row] = hit
                continue
            misses.append(row)
            if stat is not None:
                stats[row] = stat
        todo = np.asarray(misses, dtype=np.int64)
    found, failed = _parallel_sizes([rows.paths[row] for row in todo.tolist()], threads, progress)
    sizes[todo] = found
    for i, reason in failed:
        row = int(todo[i])
        problems.append(Problem(path=rows.paths[row], reason=reason, subset=rows.subset[row]))
    for row, stat in stats.items():
        if sizes[row, 0] > 0:
            caches.put(rows.paths[row], stat, (int(sizes[row, 0]), int(sizes[row, 1])))
    caches.save()
    return sizes


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


_CHUNK = 512  # paths per task: few enough futures, and progress still moves


def _sizes_of(paths: list[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """Header sizes of ``paths``, flat ``[w0, h0, w1, h1, ...]`` (0, 0 when unusable) and the reasons."""
    flat: list[int] = []
    failed: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            flat += read_image_size(path)
        except ImageProblem as err:
            flat += (0, 0)
            failed.append((i, err.reason))
    return flat, failed


def _parallel_sizes(
    paths: list[str], threads: int, progress: Callable[[int, int], None] | None
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Header sizes for ``paths`` as an ``(n, 2)`` array (0 where unusable) and ``(index, reason)``.

    Paths go to ``threads`` threads in chunks of `_CHUNK` (one future per chunk, not per file:
    a million futures cost a gigabyte). Threads overlap the file reads; the header parsing holds
    the GIL, briefly (see `stoker.data.headers`).
    """
    total = len(paths)
    sizes = np.zeros((total, 2), dtype=np.int64)
    failed: list[tuple[int, str]] = []
    if total == 0:
        return sizes, failed
    chunks = [paths[start : start + _CHUNK] for start in range(0, total, _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:
        results = pool.map(_sizes_of, chunks) if threads > 1 else map(_sizes_of, chunks)
        for n, (flat, bad) in enumerate(results):
            start = n * _CHUNK
            sizes[start : start + len(flat) // 2] = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
            failed += [(start + i, reason) for i, reason in bad]
            if progress is not None:
                progress(min(total, start + _CHUNK), total)
    return sizes, failed


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
