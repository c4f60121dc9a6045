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
import os
import platform
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = [
    "FLOAT_BLOCKS",
    "ArrivedBlocks",
    "BatchBuffers",
    "SharedBlocks",
    "reused_shared_blocks",
]

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


# --- a worker's shared-memory blocks -------------------------------------------------------------

# Each shared block ends in a header of three int64: a mark, the token of its last loan (written
# by the worker) and the token the main process gave back (copied there once it has read it).
_MARK = 0x73746F6B65726231  # "stokerb1"
_HEADER_BYTES = 64
# Blocks a worker keeps for float batches that the training loop receives as they are: the
# ``prefetch_factor`` (2) it has outstanding, its share of the batches the loop holds (the loop's
# variable, one more in a prefetching wrapper, the one just received), and one spare.
FLOAT_BLOCKS = 6


class _SharedBlock:
    __slots__ = ("capacity", "header", "storage")

    def __init__(self, storage: torch.UntypedStorage, capacity: int) -> None:
        self.storage = storage
        self.capacity = capacity
        self.header = _header(storage)

    def free(self) -> bool:
        return int(self.header[1]) == int(self.header[2])


class SharedBlocks:
    """A DataLoader worker's reused shared-memory blocks for batches that go to the main process.

    A worker's batch travels through shared memory. Built in a fresh segment, each batch costs the
    worker a new ``/dev/shm`` file whose pages the kernel zeroes as they are written, and the
    main process a new mapping that it faults in while reading and unmaps afterwards (about
    4 ms of CPU per 1 MP image in all on 2 CPUs; issue #11). With these blocks a worker writes
    each batch into a block it sent before, and the main process, which keeps the blocks mapped
    (`ArrivedBlocks`), finds the mapping in torch's cache of shared storages.

    A block is lent again only after the main process gave it back: `ArrivedBlocks.give_back`
    copies the token of the block's last loan into the block's header after the batch was read
    (converted to float), and the worker checks the copy before writing. That order holds on
    x86-64, where a store is never made visible before the loads that precede it in program
    order (the main process's reads of the batch before its give-back); elsewhere, and for
    batches nobody gives back (``output="uint8"`` batches go to the user as they are), use
    ordinary fresh segments (`stoker.torch_internals.new_shared_tensor`).
    """

    def __init__(self, blocks: int = DEFAULT_BLOCKS, *, block_bytes: int = 0) -> None:
        self.blocks = blocks
        self.block_bytes = block_bytes  # the least a block holds: the largest batch, when known
        self._pid = 0
        self._kept: list[_SharedBlock] = []
        self._token = 0
        self._misses = 0  # loans refused because every block was lent

    def __getstate__(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "block_bytes": self.block_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["blocks"]), block_bytes=int(state["block_bytes"]))  # type: ignore[misc]

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in shared memory: in a given-back block when there is one."""
        from stoker import torch_internals

        if self._pid != os.getpid():  # a forked copy: the parent's blocks are not this worker's
            self._pid, self._kept, self._misses = os.getpid(), [], 0
        nbytes = math.prod(shape) * dtype.itemsize
        block = self._block_for(nbytes) if nbytes >= MIN_BYTES and _ORDERED_STORES else None
        if block is None:
            return torch_internals.new_shared_tensor(shape, dtype)
        self._token += 1
        block.header[1] = self._token
        return torch.empty(0, dtype=dtype).set_(block.storage, 0, shape, _strides(shape))

    def _block_for(self, nbytes: int) -> _SharedBlock | None:
        from stoker import torch_internals

        free = [block for block in self._kept if block.free()]
        fitting = [block for block in free if block.capacity >= nbytes]
        if fitting:
            return min(fitting, key=lambda block: block.capacity)
        if free:
            self._kept.remove(max(free, key=lambda block: block.capacity))
        elif len(self._kept) >= self.blocks:
            self._misses += 1
            if self._misses >= 2 * self.blocks and not any(int(b.header[2]) for b in self._kept):
                # Nothing was ever given back (the loader pins batches, so `arrive` sees pinned
                # copies; or batches are not consumed through `arrive`): keep no blocks.
                self._kept, self.blocks = [], 0
            return None
        capacity = -(-max(nbytes, self.block_bytes) // _HEADER_BYTES) * _HEADER_BYTES
        try:
            memory = torch_internals.new_shared_tensor((capacity + _HEADER_BYTES,), torch.uint8)
        except RuntimeError:  # /dev/shm is full: keep what is kept, take fresh segments beyond it
            self.blocks = len(self._kept)
            return None
        if not memory.is_shared():  # type: ignore[no-untyped-call]
            return None
        block = _SharedBlock(memory.untyped_storage(), capacity)
        block.header[0], block.header[1], block.header[2] = _MARK, 0, 0
        self._kept.append(block)
        return block


class ArrivedBlocks:
    """The main process's side of `SharedBlocks`: give a block back once its batch was read, and
    keep the last ``keep`` blocks mapped so that the next batch in them maps nothing new.

    Two ways to give back: `give_back` at once (the batch was read, e.g. converted to float), or
    `lend`, which hands out the batch itself and gives its block back when nothing reaches the
    tensor it lent any more (the way `BatchBuffers` knows a block is free).
    """

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._mapped: list[torch.UntypedStorage] = []
        # Weak references (with their give-back callbacks) to the views that lent tensors hold.
        self._lent: dict[int, weakref.ref[np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["keep"]))  # type: ignore[misc]

    def give_back(self, tensor: torch.Tensor) -> bool:
        """Hand ``tensor``'s block back to its worker; call only after the last read of it.

        ``False`` (and nothing written) for a tensor that is not in a `SharedBlocks` block.
        """
        header = self._block_header(tensor)
        if header is None:
            return False
        header[2] = header[1]
        return True

    def lend(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """``tensor`` (a batch a worker wrote into a block) as a tensor for the training loop,
        whose block goes back to its worker once nothing reaches that tensor; ``None`` (nothing
        lent) for a tensor that is not in a `SharedBlocks` block.

        The returned tensor is ``torch.from_numpy`` of a NumPy view of ``tensor``: its storage
        holds the view, and every way to its memory holds its storage (see the module
        docstring), so the view dies only after the last read. Its death writes the loan's token
        into the block's given-back slot (see `SharedBlocks` for why that order is safe).
        """
        header = self._block_header(tensor)
        if header is None:
            return None
        view = tensor.numpy()[...]  # a new view object: only the lent tensor holds it
        slot, token = header.numpy(), int(header[1])
        lent = self._lent

        def given_back(ref: weakref.ref[np.ndarray]) -> None:
            slot[2] = token
            lent.pop(id(ref), None)

        ref = weakref.ref(view, given_back)
        lent[id(ref)] = ref
        return torch.from_numpy(view)

    def lent(self) -> int:
        """Blocks lent by `lend` and still reachable."""
        return len(self._lent)

    def _block_header(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The header of the `SharedBlocks` block that ``tensor`` starts, kept mapped; else None."""
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if (
            not storage.is_shared()
            or tensor.storage_offset() != 0
            or size % _HEADER_BYTES
            or size < tensor.nbytes + _HEADER_BYTES
        ):
            return None
        header = _header(storage)
        if int(header[0]) != _MARK:
            return None
        address = storage.data_ptr()
        if all(kept.data_ptr() != address for kept in self._mapped):
            self._mapped.append(storage)
            del self._mapped[: -self.keep]
        return header


def _header(storage: torch.UntypedStorage) -> torch.Tensor:
    offset = (storage.nbytes() - _HEADER_BYTES) // 8
    return torch.empty(0, dtype=torch.int64).set_(storage, offset, (3,), (1,))


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for side in reversed(shape):
        strides.append(step)
        step *= side
    return tuple(reversed(strides))


# Stores become visible in program order after earlier loads (see `SharedBlocks`).
_ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")


def reused_shared_blocks(per_worker: int = 0) -> bool:
    """Whether `SharedBlocks` reuses blocks on this machine (x86-64; elsewhere it always takes
    fresh ones) with room in ``/dev/shm`` for ``per_worker`` bytes of blocks in a worker per CPU
    this process may use (a container's default ``/dev/shm`` is 64 MiB)."""
    if not _ORDERED_STORES:
        return False
    if per_worker <= 0:
        return True
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return shm_free_bytes() >= per_worker * (cpus or 1)


def shm_free_bytes() -> int:
    """Free bytes in ``/dev/shm`` (0 where there is none)."""
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return shm.f_bavail * shm.f_frsize
