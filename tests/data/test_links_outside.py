"""Links and keys that leave the dataset: skipped and reported by default, followed on opt-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import stoker


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)


def _farm(tmp_path: Path) -> tuple[Path, Path]:
    """A subset folder with one own image and links to an image and a caption kept elsewhere."""
    store = tmp_path / "store"
    store.mkdir()
    _jpeg(store / "shared.jpg", 1)
    (store / "shared.txt").write_text("sks from the store")
    sub = tmp_path / "train" / "1_sks"
    sub.mkdir(parents=True)
    _jpeg(sub / "own.jpg", 0)
    (sub / "own.txt").write_text("sks own")
    (sub / "shared.jpg").symlink_to(store / "shared.jpg")
    (sub / "shared.txt").symlink_to(store / "shared.txt")
    return tmp_path / "train", sub


def _load(source: Path, **kwargs: object) -> stoker.StokerDataset:
    return stoker.load_dataset(
        source, resolution=256, caption_extension=".txt", on_error="skip", threads=1, **kwargs
    )


def test_links_out_of_the_folder_are_reported_by_default_and_followed_on_opt_in(tmp_path):
    train, sub = _farm(tmp_path)
    closed = _load(train)
    assert len(closed) == 1
    kinds = {(Path(p.path).name, p.kind) for p in closed.report.problems}
    assert kinds == {("shared.jpg", "outside_root")}
    assert "links_outside" in closed.report.problems[0].reason  # the message names the opt-in

    opened = _load(train, links_outside=True)
    assert len(opened) == 2 and not opened.report.problems
    captions = {Path(opened.catalog.paths[i]).name: opened.catalog.captions[i] for i in range(2)}
    assert captions == {"own.jpg": "sks own", "shared.jpg": "sks from the store"}


def test_an_opted_in_caption_link_to_a_device_is_still_refused(tmp_path):
    train, sub = _farm(tmp_path)
    (sub / "own.txt").unlink()
    (sub / "own.txt").symlink_to("/dev/zero")
    ds = _load(train, links_outside=True)
    (problem,) = ds.report.problems
    assert problem.kind == "bad_caption" and problem.path.endswith("own.txt")


def test_metadata_keys_that_climb_out_are_followed_only_on_opt_in(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _jpeg(images / "a.jpg", 0)
    private = tmp_path / "private"
    private.mkdir()
    _jpeg(private / "b.jpg", 1)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "x"}, "../private/b": {"caption": "y"}}))
    closed = _load(meta, image_dir=images)
    assert len(closed) == 1 and [p.kind for p in closed.report.problems] == ["outside_root"]
    opened = _load(meta, image_dir=images, links_outside=True)
    assert len(opened) == 2 and not opened.report.problems
    assert os.path.realpath(opened.catalog.paths[1]) == str((private / "b.jpg").resolve())


def test_the_cli_flag_opts_in(tmp_path):
    train, _ = _farm(tmp_path)
    scan = [sys.executable, "-m", "stoker.cli", "scan", str(train), "--resolution", "256"]
    scan += ["--caption-extension", ".txt", "--json"]
    closed = subprocess.run(scan, capture_output=True, text=True)
    opened = subprocess.run([*scan, "--links-outside"], capture_output=True, text=True)
    assert closed.returncode == 1, closed.stderr  # scan exits 1 when it found problems
    assert opened.returncode == 0, opened.stderr
    assert json.loads(closed.stdout)["images"] == 1
    assert json.loads(opened.stdout)["images"] == 2
