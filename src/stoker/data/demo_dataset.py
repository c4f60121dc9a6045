"""A minimal map-style dataset of square crops, used by ``stoker demo`` until full datasets load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


class SquareImages(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Each item: the image at that index, centre-cropped and resized to ``size`` x ``size``,
    as a float tensor in [-1, 1]."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = [str(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as img:
            img = ImageOps.fit(img.convert("RGB"), (self.size, self.size), Image.Resampling.BOX)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
