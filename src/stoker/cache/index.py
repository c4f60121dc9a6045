"""The index of a cache folder: every entry's keys and place in one set of columns, checked at once.

A cache folder holds shards (``<kind>-<random>.safetensors``) and one index per kind
(``<kind>-index.npz``): sorted uint64 key columns and the shard and entry number of each entry.
Checking a whole dataset is one sorted search of its keys against the index (`CacheIndex.classify`),
never a probe per file. The index is derived data: `CacheIndex.load` folds in any shard it does not
list yet (a build killed before it wrote the index, or another rank's shards) and drops rows of
shards that are gone, so the shards alone are the truth.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stoker.cache.keys import FORMAT_VERSION
from stoker.cache.shards import read_header
from stoker.errors import CacheError
from stoker.files import atomic_write

__all__ = ["CacheIndex", "CacheReport", "VALID", "STALE", "MISSING", "hex_digests"]

VALID, STALE, MISSING = 0, 1, 2
_DIGESTS = ("key", "recipe_slot", "slot", "content")


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheReport:
    """The state of a cache for one dataset.

    Attributes:
        kind: ``"latents"`` or ``"text"``.
        cache_dir: the cache folder.
        valid: entries the dataset needs that are present and current.
        stale: entries that exist for an image (or caption) but were made from something that has
            changed since (the file, the encoder weights, the dtype, the bucket settings, the caption).
        missing: entries never built.
        encoded: entries encoded by the call that returned this report.
        entries: entries the index holds in all (including ones other datasets use).
        shards: shard files in the folder.
        stale_examples, missing_examples: up to 5 image paths (or captions) of each.
    """

    kind: str
    cache_dir: str
    valid: int
    stale: int
    missing: int
    encoded: int = 0
    entries: int = 0
    shards: int = 0
    stale_examples: tuple[str, ...] = field(default=())
    missing_examples: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """True when every needed entry is valid."""
        return self.stale == 0 and self.missing == 0

    def summary(self) -> str:
        """One line: ``latents cache DIR: 10 valid, 2 stale, 1 missing``."""
        return (
            f"{self.kind} cache {self.cache_dir}: {self.valid} valid, {self.stale} stale, "
            f"{self.missing} missing"
        )


def hex_digests(digests: np.ndarray) -> list[str]:
    """``(N, 2)`` uint64 digests as 32-character hex strings."""
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in digests]


def _parse_hex(strings: list[str]) -> np.ndarray:
    raw = bytes.fromhex("".join(strings))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)


class CacheIndex:
    """Columns of one kind of entry in one folder, sorted by key.

    Attributes:
        key, recipe_slot, slot, content: ``(N, 2)`` uint64 digests (see ``stoker.cache.keys``).
        shard: index into ``shard_names`` per entry; ``entry``: the entry's number in its shard.
        shard_names, shard_sizes: the shard files (names in the folder) and their byte sizes.
        info: the recipe of the latest build (encoder digest, dtype, ...), as plain JSON data.
    """

    def __init__(self, folder: Path, kind: str) -> None:
        self.folder = folder
        self.kind = kind
        self.columns: dict[str, np.ndarray] = _empty_columns()
        self.shard_names: list[str] = []
        self.shard_sizes: list[int] = []
        self.info: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.folder / f"{self.kind}-index.npz"

    def __len__(self) -> int:
        return len(self.columns["shard"])

    # --- reading and writing -------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike[str], kind: str) -> CacheIndex:
        """The index of ``folder``, brought up to date with the shards on disk (not saved)."""
        index = cls(Path(folder), kind)
        if index.path.exists():
            index._read()
        index.reconcile()
        return index

    def _read(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                columns = {name: data[name] for name in (*_DIGESTS, "shard", "entry")}
        except (OSError, ValueError, KeyError) as err:
            raise CacheError(
                f"cache index {self.path} cannot be read ({err}); delete it: the next "
                "`stoker cache` run rebuilds it from the shards without encoding anything again"
            ) from err
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") != self.kind:
            return  # an index of another format: rebuilt from the shards below
        self.columns = columns
        self.shard_names = list(meta["shard_names"])
        self.shard_sizes = [int(s) for s in meta["shard_sizes"]]
        self.info = dict(meta.get("info", {}))

    def save(self) -> None:
        """Write the index atomically."""
        meta = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "shard_names": self.shard_names,
            "shard_sizes": self.shard_sizes,
            "info": self.info,
        }
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {**self.columns, "meta": np.array(json.dumps(meta))}
        np.savez(buffer, **arrays)

        def write(handle: BinaryIO) -> None:
            handle.write(buffer.getbuffer())

        atomic_write(self.path, write)

    def reconcile(self) -> bool:
        """Drop rows of shards that are gone or changed; add rows of shards not listed. Changed?"""
        on_disk = {
            p.name: p.stat().st_size
            for p in self.folder.glob(f"{self.kind}-*.safetensors")
            if not p.name.startswith(".")
        }
        keep = [
            i
            for i, (name, size) in enumerate(zip(self.shard_names, self.shard_sizes, strict=True))
            if on_disk.get(name) == size
        ]
        changed = len(keep) != len(self.shard_names)
        if changed:
            self._keep_shards(keep)
        known = set(self.shard_names)
        for name in sorted(on_disk.keys() - known):
            self._add_shard(name, on_disk[name])
            changed = True
        if changed:
            self._sort()
        return changed

    def _keep_shards(self, keep: list[int]) -> None:
        remap = np.full(len(self.shard_names), -1, np.int64)
        remap[keep] = np.arange(len(keep))
        rows = remap[self.columns["shard"]] >= 0
        self.columns = {k: v[rows] for k, v in self.columns.items()}
        self.columns["shard"] = remap[self.columns["shard"]].astype(np.int32)
        self.shard_names = [self.shard_names[i] for i in keep]
        self.shard_sizes = [self.shard_sizes[i] for i in keep]

    def _add_shard(self, name: str, size: int) -> None:
        _, metadata = read_header(self.folder / name)
        try:
            record = json.loads(metadata["stoker"])
            entries = record["entries"]
            digests = {k: _parse_hex(entries[k]) for k in _DIGESTS}
        except (KeyError, ValueError, TypeError) as err:
            raise CacheError(
                f"{self.folder / name} is not a stoker cache shard ({err}); move it out of the "
                "cache folder"
            ) from err
        if record.get("format") != FORMAT_VERSION:
            return  # older format: its entries can never be valid; leave it out of the index
        count = len(digests["key"])
        new = {**digests, "shard": np.full(count, len(self.shard_names), np.int32)}
        # Rows map to tensor entries one to one, unless the shard says otherwise (a text entry
        # is stored once per distinct caption and named by every image that uses it).
        entry = record.get("entry")
        new["entry"] = np.asarray(entry if entry is not None else np.arange(count), np.int32)
        self.columns = {k: np.concatenate([self.columns[k], new[k]]) for k in self.columns}
        self.shard_names.append(name)
        self.shard_sizes.append(size)
        if record.get("info"):
            self.info = dict(record["info"])

    def _sort(self) -> None:
        order = np.lexsort((self.columns["key"][:, 1], self.columns["key"][:, 0]))
        self.columns = {k: v[order] for k, v in self.columns.items()}

    # --- lookups -------------------------------------------------------------------------------

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in the index, ``-1`` where absent (one vectorised sorted search)."""
        stored = self.columns["key"]
        rows = np.searchsorted(stored[:, 0], keys[:, 0])
        rows = np.minimum(rows, max(len(stored) - 1, 0))
        if len(stored) == 0:
            return np.full(len(keys), -1, np.int64)
        hit = (stored[rows, 0] == keys[:, 0]) & (stored[rows, 1] == keys[:, 1])
        return np.where(hit, rows, -1).astype(np.int64)

    def classify(
        self, key: np.ndarray, recipe_slot: np.ndarray, slot: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Status (``VALID``/``STALE``/``MISSING``) and row (``-1`` unless valid) of each entry."""
        rows = self.find(key)
        status = np.full(len(key), MISSING, np.int8)
        status[rows >= 0] = VALID
        absent = rows < 0
        if absent.any():
            known = _contains(self.columns["slot"], slot[absent])
            known |= _contains(self.columns["recipe_slot"], recipe_slot[absent])
            status[np.flatnonzero(absent)[known]] = STALE
        return status, rows

    def rows_of_recipe_slot(self, recipe_slot: np.ndarray) -> np.ndarray:
        """For each recipe slot, the last index row with it (``-1`` if none)."""
        stored = self.columns["recipe_slot"]
        order = np.lexsort((stored[:, 1], stored[:, 0]))
        ordered = stored[order]
        pos = np.searchsorted(ordered[:, 0], recipe_slot[:, 0], side="right") - 1
        pos = np.maximum(pos, 0)
        if len(ordered) == 0:
            return np.full(len(recipe_slot), -1, np.int64)
        hit = (ordered[pos, 0] == recipe_slot[:, 0]) & (ordered[pos, 1] == recipe_slot[:, 1])
        return np.where(hit, order[pos], -1).astype(np.int64)

    def add_aliases(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Make ``keys`` other names of the entries at ``rows`` (unchanged files, new mtimes)."""
        new = {k: v[rows].copy() for k, v in self.columns.items()}
        new["key"] = keys.reshape(-1, 2).astype(np.uint64)
        self.columns = {k: np.concatenate([v, new[k]]) for k, v in self.columns.items()}
        self._sort()


def _contains(stored: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Which ``wanted`` digests occur in ``stored`` (both ``(N, 2)``)."""
    if len(stored) == 0 or len(wanted) == 0:
        return np.zeros(len(wanted), bool)
    as_void = np.dtype((np.void, 16))
    have = np.ascontiguousarray(stored).view(as_void).reshape(-1)
    want = np.ascontiguousarray(wanted).view(as_void).reshape(-1)
    found: np.ndarray = np.isin(want, have)
    return found


def _empty_columns() -> dict[str, np.ndarray]:
    columns: dict[str, np.ndarray] = {k: np.zeros((0, 2), np.uint64) for k in _DIGESTS}
    columns["shard"] = np.zeros(0, np.int32)
    columns["entry"] = np.zeros(0, np.int32)
    return columns
