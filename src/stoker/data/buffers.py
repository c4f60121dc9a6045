"""Reusable memory for the batches a process builds: `BatchBuffers`.

A float batch of four 1 MP images is 48 MiB. glibc serves any allocation above 32 MiB (its
largest mmap threshold) with a fresh ``mmap``, so every such batch is new memory that the kernel
faults in and zeroes page by page while the batch is written, then unmaps when it is dropped:
about 3,000 page faults and 8 ms of CPU per image at resolution 1024, a fifth of an epoch through
``make_loader(workers=0)`` (issue #11). `BatchBuffers` hands out batch tensors backed by a few
kept blocks of memory instead, and reuses a block only when nothing can reach the tensor it lent
last time.

Why that is certain: a lent tensor is ``torch.from_numpy`` of a NumPy view into the block, and the
tensor's storage holds that view until the storage is freed. Every way to the memory (the tensor,
its views and slices, ``.numpy()``, ``untyped_storage()``, DLPack, autograd's saved tensors) keeps
the storage, so keeps the view. The pool keeps only a weak reference to the view: once it is
dead, no storage uses the block. No private torch member is involved.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["BatchBuffers"]

# Blocks kept per process: the training loop's variable holds batch k while batch k+1 is built,
# and a prefetching wrapper (accelerate) holds one more, so three are in use; one spare.
DEFAULT_BLOCKS = 4
# Below this, malloc reuses freed heap memory on its own.
MIN_BYTES = 1 << 20


class _Block:
    __slots__ = ("lent", "memory")

    def __init__(self, nbytes: int) -> None:
        self.memory: np.ndarray = torch.empty(nbytes, dtype=torch.uint8).numpy()
        self.lent: weakref.ref[np.ndarray] | None = None

    @property
    def capacity(self) -> int:
        return int(self.memory.nbytes)

    def free(self) -> bool:
        return self.lent is None or self.lent() is None


class BatchBuffers:
    """Batch tensors in reused memory (see the module docstring); one pool per process.

    ``empty(shape, dtype)`` is ``torch.empty(shape, dtype=dtype)`` with its memory taken from a
    free kept block when there is one (the smallest that fits), else from a new block while fewer
    than ``blocks`` are kept, else from ``torch.empty``. Small tensors (under 1 MiB) always come
    from ``torch.empty``. A block grows (is replaced) when a larger batch needs it. The contents
    are uninitialised either way: callers write every element. Thread-safe; pickles (for spawned
    workers) as an empty pool.

    The kept blocks stay allocated while the pool lives (at most ``blocks`` times the largest
    batch); ``clear()`` drops the free ones.
    """

    def __init__(self, blocks: int = DEFAULT_BLOCKS) -> None:
        self.blocks = blocks
        self._kept: list[_Block] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"blocks": self.blocks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["blocks"]))  # type: ignore[misc]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            block = self._block_for(nbytes)
            if block is None:
                return torch.empty(shape, dtype=dtype)
            view = block.memory[:nbytes].view(_numpy_dtype(dtype)).reshape(shape)
            block.lent = weakref.ref(view)
        return torch.from_numpy(view)

    def kept_bytes(self) -> int:
        """Bytes held in kept blocks, lent or free."""
        with self._lock:
            return sum(block.capacity for block in self._kept)

    def clear(self) -> None:
        """Drop the kept blocks that are free (lent ones stay until their batch is dropped)."""
        with self._lock:
            self._kept = [block for block in self._kept if not block.free()]

    def _block_for(self, nbytes: int) -> _Block | None:
        free = [block for block in self._kept if block.free()]
        fitting = [block for block in free if block.capacity >= nbytes]
        if fitting:
            return min(fitting, key=lambda block: block.capacity)
        if free:  # a free block too small: replace the largest such with one that fits
            self._kept.remove(max(free, key=lambda block: block.capacity))
        elif len(self._kept) >= self.blocks:
            return None
        block = _Block(nbytes)
        self._kept.append(block)
        return block


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return torch.empty(0, dtype=dtype).numpy().dtype
