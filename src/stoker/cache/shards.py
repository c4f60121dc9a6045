"""Shard files: many cache entries in one safetensors file, written atomically, read through mmap.

The format is plain safetensors (an 8-byte little-endian header length, a JSON header of tensor
names, dtypes, shapes and byte ranges, then the bytes), so ``safetensors.safe_open`` reads every
shard. stoker writes and reads it itself: the read path needs no extra package, reads an entry as
a view of the mapped file (no parse per entry, no copy until the batch is stacked), and knows bf16
without NumPy support for it.

Each shard's ``__metadata__["stoker"]`` holds its entries' keys as JSON, so the index can always be
rebuilt from the shards alone (`read_header`); a shard is written by ``stoker.files.atomic_write``,
so a killed build leaves whole shards or none.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from stoker.errors import CacheError
from stoker.files import atomic_write

__all__ = ["DTYPES", "ShardReader", "TensorSpec", "read_header", "write_shard"]

# safetensors dtype names <-> torch dtypes stoker stores.
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I32": torch.int32,
    "I64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HEADER_LIMIT = 1 << 30


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Where one tensor lies in a shard: dtype name, shape, and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def write_shard(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
) -> int:
    """Write ``tensors`` (name, CPU tensor) as one safetensors file, atomically; return its size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    payloads = []
    for name, tensor in tensors:
        if tensor.dtype not in _NAMES:
            raise ValueError(f"cannot store {tensor.dtype} in a shard; use one of {list(DTYPES)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        payloads.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned

    def write(handle: BinaryIO) -> None:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for data in payloads:
            handle.write(data.data)

    atomic_write(path, write)
    return 8 + len(encoded) + offset


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The tensors (absolute byte ranges) and ``__metadata__`` of a shard.

    Raises:
        CacheError: the file is not a whole safetensors file (names it, and says to rebuild).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, _HEADER_LIMIT):
                raise ValueError("bad header length")
            raw = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CacheError(
            f"{path} is not a readable cache shard ({err}); delete it and run the cache build "
            "again (stoker cache SOURCE ...): it encodes only what is missing"
        ) from err
    metadata = raw.pop("__metadata__", {}) or {}
    base = 8 + length
    specs = {}
    for name, info in raw.items():
        start, end = (int(v) for v in info["data_offsets"])
        specs[name] = TensorSpec(info["dtype"], tuple(info["shape"]), base + start, base + end)
    if specs and max(s.end for s in specs.values()) != size:
        raise CacheError(
            f"{path} is cut short or padded ({size} bytes); delete it and run the cache build "
            "again (stoker cache SOURCE ...)"
        )
    return specs, metadata


class ShardReader:
    """Reads byte ranges of a shard straight into tensors (``preadv``: one copy, from the page
    cache into the destination; measured 26 us per 256 KB against 34 us through an mmap view and
    180 us on first touch of fresh mappings).

    Picklable: the file is reopened lazily in each worker process.
    """

    def __init__(self, path: str | os.PathLike[str], expected_size: int | None = None) -> None:
        self.path = Path(path)
        self.expected_size = expected_size
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "expected_size": self.expected_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.expected_size = state["expected_size"]
        self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def _opened(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise CacheError(
                    f"cannot read cache shard {self.path} ({err}); run the cache build again "
                    "(stoker cache SOURCE ...)"
                ) from err
            size = os.fstat(fd).st_size
            if self.expected_size is not None and size != self.expected_size:
                os.close(fd)
                raise CacheError(
                    f"cache shard {self.path} is {size} bytes, the index expects "
                    f"{self.expected_size}: it changed after the index was written. "
                    "Run the cache build again (stoker cache SOURCE ...)"
                )
            self._fd = fd
        return self._fd

    def read_into(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor ``out`` with the bytes at ``start``; returns ``out``."""
        view = out.view(-1).view(torch.uint8).numpy()
        got = os.preadv(self._opened(), [memoryview(view)], start)  # type: ignore[arg-type]
        if got != view.nbytes:
            raise CacheError(
                f"cache shard {self.path} ends early (read {got} of {view.nbytes} bytes at "
                f"{start}); run the cache build again (stoker cache SOURCE ...)"
            )
        return out

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """The tensor at ``spec``, read into new memory."""
        out = torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
        return self.read_into(spec.start, out)
