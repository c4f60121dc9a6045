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


WORDS = ["a", "photo", "of", "sks", "dog", "view", "cat", "red", "blue", "0", "1", "2", ","]


def tiny_clip(seed: int = 0, *, projection: bool = False):
    """A transformers CLIP text model and its tokenizer: a real BPE vocabulary of a few words."""
    transformers = pytest.importorskip("transformers")
    import torch

    chars = sorted(set("".join(WORDS)))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        current = word[0]
        for i, c in enumerate(word[1:]):
            right = c + "</w>" if i == len(word) - 2 else c
            merges.append((current, right))
            current += right
            vocab.setdefault(current, len(vocab))
    # transformers 5.x: vocab= and merges= objects (vocab_file= is silently ignored).
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 16
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab) + 4,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config), tokenizer
