"""Latent and text-encoder caches: safetensors shards with one index, never stale, read via mmap.

``cache_latents`` and ``cache_text_encoder_outputs`` build them; ``load_dataset(latent_cache=...,
text_cache=...)`` reads them (`attach_caches`); ``check_caches`` reports valid, stale and missing
entries. Layout and rules: docs/cache.md.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from stoker.cache.index import CacheReport
from stoker.cache.latents import cache_latents, check_latent_cache, open_latent_cache
from stoker.cache.text import cache_text_encoder_outputs, check_text_cache, open_text_cache

__all__ = [
    "CacheReport",
    "attach_caches",
    "cache_latents",
    "cache_text_encoder_outputs",
    "check_caches",
]


def attach_caches(
    dataset: Any,
    *,
    latent_cache: str | os.PathLike[str] | None = None,
    text_cache: str | os.PathLike[str] | None = None,
    vae: Any = None,
) -> None:
    """Make ``dataset`` read latents (and text-encoder outputs) from caches instead of images.

    Raises:
        CacheError: a cache is incomplete or stale (see `CacheReport`), or the dataset uses a
            setting a cache cannot serve.
    """
    if latent_cache is not None:
        dataset.latents = open_latent_cache(dataset, latent_cache, vae=vae)
    if text_cache is not None:
        dataset.text = open_text_cache(dataset, text_cache)


def check_caches(
    dataset: Any,
    *,
    latent_cache: str | os.PathLike[str] | Literal[False] | None = None,
    text_cache: str | os.PathLike[str] | Literal[False] | None = None,
) -> list[CacheReport]:
    """Reports (valid, stale, missing) of ``dataset``'s caches.

    ``None`` takes a folder from the dataset config's ``latent_cache``/``text_cache``; ``False``
    skips that cache.

    A stale or missing entry is reported, not raised.

    Raises:
        CacheError: a cache cannot be read, or the dataset uses a setting it cannot serve.
    """
    if latent_cache is None:
        latent_cache = dataset.datasets[0].latent_cache
    if text_cache is None:
        text_cache = dataset.datasets[0].text_cache
    reports = []
    if latent_cache:
        reports.append(check_latent_cache(dataset, latent_cache).report)
    if text_cache:
        reports.append(check_text_cache(dataset, text_cache).report)
    return reports
