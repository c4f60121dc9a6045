"""Fixtures of the cache tests: a tiny VAE saved with save_pretrained, a dataset folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_models import Folder, tiny_vae, write_dataset


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture
def folder(tmp_path) -> Folder:
    return write_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def clip_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(text encoder folder, tokenizer folder), written with save_pretrained."""
    from cache_models import tiny_clip

    model, tokenizer = tiny_clip()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder / "text_encoder", folder / "tokenizer"
