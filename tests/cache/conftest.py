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
