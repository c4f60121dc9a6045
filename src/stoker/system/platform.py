"""What this process runs on: CUDA, the multiprocessing start methods, and its rank (torchrun)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping

__all__ = ["cuda_available", "default_start_method", "distributed_from_env", "start_methods"]


def cuda_available() -> bool:
    """Whether torch sees a CUDA device; ``False`` on any error (a broken driver must not stop
    data loading) and without importing torch's CUDA runtime when torch is not imported yet."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def start_methods() -> list[str]:
    """The start methods this platform offers, its default first (as ``multiprocessing`` says)."""
    return list(multiprocessing.get_all_start_methods())


def default_start_method() -> str:
    """The start method a DataLoader uses when none is given: the one set for this process, else
    the platform's default (fork on Linux before Python 3.14, forkserver from 3.14, spawn on macOS
    and Windows)."""
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    return start_methods()[0]


def distributed_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun/accelerate's ``RANK`` and ``WORLD_SIZE``; else (0, 1)."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        return 0, 1
    return rank, world_size
