"""Random generators keyed on (seed, epoch, sample position), so results never depend on the worker.

Every random choice in stoker (batch order, caption shuffle, crops, flips, replacements of bad files)
draws from a generator built here from plain integers. Two processes that build the generator for the
same key get the same stream, whichever worker, start method or rank they run in.
"""

from __future__ import annotations

import enum

import numpy as np

_MASK_64 = (1 << 64) - 1


class Stream(enum.IntEnum):
    """Independent purposes; each gets its own stream for the same (seed, epoch, position)."""

    ORDER = 0
    CAPTION = 1
    IMAGE = 2
    REPLACE = 3
    SPLIT = 4
    LATENT = 5


def keyed_rng(seed: int, epoch: int, position: int, stream: Stream) -> np.random.Generator:
    """Return a generator that depends only on its four integer arguments.

    ``seed`` may be any Python int (negative values are taken modulo 2**64); ``epoch`` and ``position``
    must be >= 0.
    """
    key = [int(stream), seed & _MASK_64, int(epoch), int(position)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
