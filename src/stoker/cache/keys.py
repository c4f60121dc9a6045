"""Cache keys: 128-bit digests of what an entry was made from, computed for a whole dataset at once.

An entry is valid only when everything that went into it is unchanged, so its key mixes the image's
identity (path, byte size, ``st_mtime_ns``) with its recipe (encoder weights digest, dtype, bucket,
resize, crop, views, format version). Keys are pairs of uint64 (``(N, 2)`` arrays): a strong hash
(BLAKE2b) of each string, then numeric fields folded in with a 64-bit mixer in NumPy, so keying
100,000 images is a few vectorised passes, not 100,000 Python hash calls per field.

Three digests per entry let a report tell *stale* from *missing*: ``key`` (identity + recipe),
``recipe_slot`` (path + recipe: the entry an unchanged file would have) and ``slot`` (path only: some
entry for this file exists). A file whose size or mtime changed is re-hashed by content
(`content_digest`), so touching or copying a dataset does not force a rebuild.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "combine",
    "content_digest",
    "digest_strings",
    "file_identity",
    "model_digest",
]

# Bump when the meaning of stored bytes changes: every old entry then reads as stale.
FORMAT_VERSION = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def digest_strings(strings: Iterable[str]) -> np.ndarray:
    """BLAKE2b-128 of each string (UTF-8, surrogates kept) as an ``(N, 2)`` uint64 array."""
    raw = b"".join(
        hashlib.blake2b(s.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        for s in strings
    )
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2).copy()


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit changes about half the output bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def combine(digests: np.ndarray, *fields: np.ndarray) -> np.ndarray:
    """Fold integer columns (or ``(N, 2)`` digests) into ``(N, 2)`` digests, order-sensitively."""
    hi = digests[:, 0].copy()
    lo = digests[:, 1].copy()
    with np.errstate(over="ignore"):
        for number, field in enumerate(fields, start=1):
            columns = field if field.ndim == 2 else field.astype(np.int64).view(np.uint64)[:, None]
            for column in range(columns.shape[1]):
                value = columns[:, column].astype(np.uint64)
                salt = np.uint64(number * 2 + column) * _GOLDEN
                hi = _splitmix(hi ^ _splitmix(value + salt))
                lo = _splitmix(lo ^ _splitmix(value ^ ~salt))
    stacked: np.ndarray = np.stack([hi, lo], axis=1)
    return stacked


def file_identity(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(size, st_mtime_ns)`` per file as int64 arrays; ``-1`` for a file that cannot be stat'ed."""
    sizes = np.full(len(paths), -1, np.int64)
    mtimes = np.full(len(paths), -1, np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i] = st.st_size
        mtimes[i] = st.st_mtime_ns
    return sizes, mtimes


def content_digest(path: str | os.PathLike[str]) -> np.ndarray:
    """BLAKE2b-128 of a file's bytes as a ``(2,)`` uint64 array (``[0, 0]`` if unreadable)."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return np.zeros(2, np.uint64)
    return np.frombuffer(h.digest(), dtype="<u8").copy()


def model_digest(model: Any) -> str:
    """A hex digest of a torch module's weights (names, dtypes, shapes, bytes) and its class.

    The same weights give the same digest whether the module came from ``from_pretrained`` of a
    folder or was built in memory, and whatever device it sits on; any changed weight changes it.
    A model's ``config`` (diffusers/transformers) is mixed in when it has one.
    """
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(repr(sorted(_plain_config(config).items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plain_config(config: Any) -> dict[str, str]:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Bookkeeping fields that differ between a saved and an in-memory copy of the same model.
    skip = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"}
    return {str(k): repr(v) for k, v in items.items() if k not in skip}
