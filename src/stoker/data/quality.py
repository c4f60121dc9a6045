"""How close a resize path is to exact area resampling: PSNR, and aliasing on a zone plate.

Used by tests/data/test_quality.py (the contract: at least 40 dB on photos, no visible aliasing)
and by benchmarks/run.py (the figures in docs/performance.md). The reference is what sd-scripts
does by default when it shrinks an image: the full decode resampled by exact pixel-area averaging
(OpenCV's ``INTER_AREA``), written here in float64 so it needs no OpenCV.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["aliasing", "area_reference", "area_weights", "psnr", "zone_plate", "zone_plate_bands"]

ZONE_PLATE_AMPLITUDE = 100.0


def area_weights(source: int, target: int) -> np.ndarray:
    """The ``(target, source)`` matrix of exact pixel-area averaging along one axis (shrinking)."""
    scale = source / target
    edges = np.arange(target + 1) * scale
    low, high = edges[:-1, None], edges[1:, None]
    left = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(high, left + 1) - np.maximum(low, left), 0, None)
    weights: np.ndarray = overlap / scale
    return weights


def area_reference(
    path: str | os.PathLike[str], resized_wh: tuple[int, int], bucket_wh: tuple[int, int]
) -> np.ndarray:
    """Full decode, exact area resampling, centre crop, ``x / 127.5 - 1``: ``(3, h, w)`` float64."""
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB"), dtype=np.float64)
    rows = area_weights(full.shape[0], resized_wh[1])
    cols = area_weights(full.shape[1], resized_wh[0])
    resized = np.stack([rows @ full[..., c] @ cols.T for c in range(3)])
    top = (resized_wh[1] - bucket_wh[1]) // 2
    left = (resized_wh[0] - bucket_wh[0]) // 2
    crop = resized[:, top : top + bucket_wh[1], left : left + bucket_wh[0]]
    out: np.ndarray = crop / 127.5 - 1.0
    return out


def psnr(mine: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [-1, 1] (peak 255 steps)."""
    mse = float(np.mean(((np.asarray(mine) - np.asarray(reference)) * 127.5) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def zone_plate(size: int) -> np.ndarray:
    """``128 + 100 cos(pi r^2 / size)``, uint8: local frequency ``r / size``, Nyquist at the edges."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - size / 2 + 0.5
    plate = 128 + ZONE_PLATE_AMPLITUDE * np.cos(np.pi * (x * x + y * y) / size)
    rounded: np.ndarray = np.round(plate).astype(np.uint8)
    return rounded


def zone_plate_bands(shape: tuple[int, ...], source_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks over a resized zone plate: source frequency above 1.5x and below 0.5x output Nyquist."""
    height, width = shape[:2]
    scale = source_size / width
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    radius = np.hypot((u + 0.5) * scale - source_size / 2, (v + 0.5) * scale - source_size / 2)
    nyquist_radius = 0.5 / scale * source_size  # where the local frequency r / size is 0.5 / scale
    above = (radius > 1.5 * nyquist_radius) & (radius < 0.45 * source_size)
    return above, radius < 0.5 * nyquist_radius


def aliasing(resized_plate: np.ndarray, source_size: int) -> float:
    """Spread of a resized zone plate (0..255) above the output's Nyquist, per unit of amplitude.

    A perfect low-pass leaves flat grey there (0); a resize without antialiasing leaves moire of
    about the full amplitude (0.7 for 1536 -> 512).
    """
    above, _ = zone_plate_bands(resized_plate.shape, source_size)
    return float(np.std(resized_plate[above]) / ZONE_PLATE_AMPLITUDE)
