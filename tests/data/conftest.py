"""Real dataset folders on disk, with good and bad files of every kind the tests need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_formats import FORMAT_NAMES
from stoker.data.synthetic import write_image


@dataclass
class Messy:
    """A train_data_dir with one good subset of mixed formats and a folder of bad files."""

    root: Path
    train: Path
    good: Path
    bad_names: dict[str, str]  # file name -> the reason stoker should give (a fragment)


def _rgb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_formats(folder: Path, rng: np.random.Generator) -> list[str]:
    """One image of each format and mode stoker must read; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "photo.jpg", 320, 240, rng)
    write_image(folder / "wide.JPG", 400, 200, rng)
    Image.fromarray(
        np.dstack([_rgb(rng, 256, 256), np.full((256, 256), 128, np.uint8)]), "RGBA"
    ).save(folder / "alpha.png")
    pal = Image.fromarray(_rgb(rng, 200, 300)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    deep = (rng.integers(0, 65536, size=(240, 240))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(_rgb(rng, 300, 200)).save(folder / "web.webp")
    Image.fromarray(_rgb(rng, 256, 256)).convert("CMYK").save(folder / "cmyk.jpg")
    rotated = Image.fromarray(_rgb(rng, 320, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: upright size is 200x320
    rotated.save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(_rgb(rng, 256, 256)).save(folder / "plain.bmp")
    names = list(FORMAT_NAMES)
    for name in names:
        (folder / name).with_suffix(".caption").write_text(f"sks, {Path(name).stem}, tag a, tag b")
    return names


def write_bad_files(folder: Path, rng: np.random.Generator) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    write_image(folder / "tiny.jpg", 20, 20, rng)
    full = folder / "full.jpg"
    write_image(full, 320, 240, rng)
    data = full.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    full.unlink()
    write_image(folder / "latin1.jpg", 256, 256, rng)
    (folder / "latin1.caption").write_bytes("caf\xe9, cr\xe8me".encode("latin-1"))
    write_image(folder / "empty.jpg", 256, 256, rng)
    (folder / "empty.caption").write_text("   \n")
    return {
        "zero.jpg": "zero-byte",
        "text.png": "not an image",
        "tiny.jpg": "shorter than",
        "latin1.caption": "not UTF-8",
        "empty.caption": "empty",
    }


@pytest.fixture
def messy(tmp_path: Path) -> Messy:
    rng = np.random.default_rng(3)
    train = tmp_path / "train"
    good = train / "2_sks"
    write_formats(good, rng)
    bad = write_bad_files(train / "1_bad", rng)
    return Messy(root=tmp_path, train=train, good=good, bad_names=bad)
