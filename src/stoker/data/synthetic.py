"""Write small, deterministic sd-scripts-style datasets: for the demo, the tests and the benchmarks.

Images are smooth colour gradients with a few shapes (cheap to make, and they compress like photos
rather than like noise), in varied aspect ratios, as JPEG and PNG, each with a caption file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stoker.files import atomic_write_bytes

__all__ = ["SampleDataset", "write_sample_dataset", "write_image"]

# (width, height) pairs of common photo and render shapes, landscape, portrait and square.
_SHAPES = ((640, 480), (480, 640), (512, 512), (768, 432), (432, 768), (600, 400), (400, 600))
_TAGS = ("outdoors", "smiling", "red collar", "grass", "sunlight", "sitting", "close-up", "blurry")


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDataset:
    """Where a written sample dataset lives.

    Attributes:
        root: the folder holding everything.
        train_data_dir: the ``N_name`` folders (sd-scripts' ``train_data_dir``).
        config: a dataset config TOML that points at the same images.
        images: how many images were written.
    """

    root: Path
    train_data_dir: Path
    config: Path
    images: int


def write_image(path: Path, width: int, height: int, rng: np.random.Generator) -> None:
    """Write one synthetic image of the given size; the format follows the file extension."""
    atomic_write_bytes(path, _image_bytes(path, width, height, rng))


def _image_bytes(path: Path, width: int, height: int, rng: np.random.Generator) -> bytes:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, size=(3, 2)).astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = base[c] + slope[c, 0] * x + slope[c, 1] * y
    cy, cx, r = (
        rng.uniform(0.2, 0.8) * height,
        rng.uniform(0.2, 0.8) * width,
        min(width, height) / 5,
    )
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    buffer = io.BytesIO()
    image_format = Image.registered_extensions()[path.suffix.lower()]
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        buffer, format=image_format, quality=90
    )
    return buffer.getvalue()


def write_sample_dataset(
    root: str | Path, *, images: int = 24, seed: int = 0, resolution: int = 512
) -> SampleDataset:
    """Write a two-subset DreamBooth-style dataset (``10_sks dog`` and ``1_dog`` as regularisation).

    Three in four images go to the training subset; the rest are regularisation images. The same
    ``seed`` writes the same bytes, so writing into the same folder again is harmless; a file
    already there with other content is never overwritten.

    Raises:
        ValueError: ``root`` holds a file of the same name with other content (nothing is written).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train = root / "train"
    reg = root / "reg"
    subsets = {train / "10_sks dog": "sks dog", reg / "1_dog": "dog"}
    folders = list(subsets)
    files: dict[Path, bytes] = {}
    for i in range(images):
        folder = folders[0] if i % 4 != 3 else folders[1]
        width, height = _SHAPES[i % len(_SHAPES)]
        ext = ".png" if i % 5 == 4 else ".jpg"
        image = folder / f"img_{i:04d}{ext}"
        files[image] = _image_bytes(image, width, height, rng)
        tags = rng.choice(len(_TAGS), size=3, replace=False)
        caption = ", ".join([subsets[folder], *(_TAGS[t] for t in sorted(tags))])
        files[folder / f"img_{i:04d}.caption"] = (caption + "\n").encode("utf-8")
    config = root / "dataset.toml"
    files[config] = _config_text(resolution).encode("utf-8")
    _refuse_to_overwrite(root, files)
    for folder in subsets:
        folder.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return SampleDataset(root=root, train_data_dir=train, config=config, images=images)


def _refuse_to_overwrite(root: Path, files: dict[Path, bytes]) -> None:
    """Raise before writing anything when a file of ours would replace one with other content."""
    clashes = []
    for path, data in files.items():
        if path.is_symlink() or (path.exists() and path.read_bytes() != data):
            clashes.append(str(path.relative_to(root)))
    if clashes:
        shown = ", ".join(clashes[:5]) + (
            f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        )
        raise ValueError(
            f"{root} already holds files the sample dataset would overwrite ({shown}); "
            "choose a new or empty folder (stoker never overwrites your files)"
        )


def _config_text(resolution: int) -> str:
    return f"""# Written by stoker's sample dataset: an sd-scripts dataset config.
[general]
enable_bucket = true
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = {resolution}
batch_size = 2

  [[datasets.subsets]]
  image_dir = "train/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "reg/1_dog"
  class_tokens = "dog"
  is_reg = true
  num_repeats = 1
"""
