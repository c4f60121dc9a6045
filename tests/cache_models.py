"""Tiny real models (random weights) and small dataset folders for the cache tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stoker.data.synthetic import write_image

SIZES = [(256, 256), (320, 240), (240, 320), (300, 200), (256, 256), (200, 300), (320, 256)]


def tiny_vae(seed: int = 0):
    """A diffusers AutoencoderKL with four down blocks: the real 8x downsampling, 8-32 channels."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


@dataclass
class Folder:
    root: Path
    images: list[Path]
    config: Path


def write_dataset(root: Path, *, flip: bool = True, extra: str = "") -> Folder:
    """A DreamBooth folder of photo-like JPEGs in several buckets, with captions and a TOML."""
    subset = root / "img"
    subset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = []
    for i, (w, h) in enumerate(SIZES):
        path = subset / f"{i}.jpg"
        write_image(path, w, h, rng)
        path.with_suffix(".txt").write_text(f"a photo of sks dog, view {i % 3}")
        images.append(path)
    config = root / "train.toml"
    config.write_text(
        "[general]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\n"
        "max_bucket_reso = 256\nbucket_reso_steps = 64\ncaption_extension = '.txt'\n"
        f"batch_size = 2\nflip_aug = {str(flip).lower()}\n{extra}\n"
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\nnum_repeats = 2\n"
    )
    return Folder(root=root, images=images, config=config)
