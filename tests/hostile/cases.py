"""The hostile-input corpus: each case builds a folder, runs stoker on it, and states the outcome class.

A case's ``build(folder)`` writes files; its ``run(folder)`` loads (and, where decode matters,
iterates) and returns the problems stoker reported. ``expect`` is the promised outcome:
``works`` (nothing reported), ``skip:<kind>`` (a reported problem of that ``Problem.kind``) or
``error:<class>`` (a stoker error or ValueError of that class), with ``match`` a fragment the
message or the problem reasons must hold. The driver runs cases in a subprocess with a timeout,
so a hang or a traceback is caught as such.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import stoker
from stoker.errors import Problem

RESOLUTION = 256


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], None]
    run: Callable[[Path], list[Problem]]
    expect: str
    match: str = ""
    warns: str = ""  # a fragment one of the warnings must hold


CASES: dict[str, Case] = {}


def case(
    expect: str,
    match: str = "",
    run: Callable[[Path], list[Problem]] | None = None,
    warns: str = "",
) -> Any:
    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES[build.__name__] = Case(build, run or load_only, expect, match, warns)
        return build

    return register


# --- helpers -------------------------------------------------------------------------------------


def pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def subset_dir(folder: Path) -> Path:
    sub = folder / "train" / "1_sks"
    sub.mkdir(parents=True, exist_ok=True)
    return sub


def good(folder: Path, count: int = 2, size: tuple[int, int] = (256, 256)) -> Path:
    """A train_data_dir with ``count`` good captioned images; returns the subset folder."""
    sub = subset_dir(folder)
    for i in range(count):
        Image.fromarray(pixels(*size, seed=i)).save(sub / f"good{i}.jpg", quality=85)
        (sub / f"good{i}.caption").write_text(f"sks photo {i}")
    return sub


def load(folder: Path, **kwargs: Any) -> stoker.StokerDataset:
    kwargs.setdefault("resolution", RESOLUTION)
    kwargs.setdefault("on_error", "skip")
    kwargs.setdefault("threads", 1)
    source = kwargs.pop("source", folder / "train")
    return stoker.load_dataset(source, **kwargs)


def load_only(folder: Path) -> list[Problem]:
    return list(load(folder).report.problems)


def load_and_iterate(folder: Path, **kwargs: Any) -> list[Problem]:
    """Load, run one whole epoch in the main process, return every reported problem."""
    workers = kwargs.pop("workers", 0)
    ds = load(folder, **kwargs)
    loader = stoker.make_loader(ds, workers=workers, monitor=False)
    batches = sum(1 for _ in loader)
    if batches != ds.report.batches_per_epoch and not ds.report.problems:
        raise AssertionError(f"{batches} batches, expected {ds.report.batches_per_epoch}")
    return list(ds.report.problems)


def replace_file(path: Path, image: Image.Image, **save: Any) -> None:
    tmp = path.with_name("tmp-" + path.name)
    image.save(tmp, format=save.pop("format", None), **save)
    os.replace(tmp, path)


# --- works: images of every format and mode ------------------------------------------------------


@case("works", run=load_and_iterate)
def formats_every_mode(folder: Path) -> None:
    sub = subset_dir(folder)
    Image.fromarray(pixels(256, 256)).convert("CMYK").save(sub / "cmyk.jpg")
    deep = np.random.default_rng(0).integers(0, 65536, size=(256, 256)).astype(np.uint16)
    Image.fromarray(deep).save(sub / "deep16.png")
    pal = Image.fromarray(pixels(256, 256)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(sub / "palette_alpha.png", transparency=0)
    Image.fromarray(pixels(256, 256)).save(sub / "web.webp")
    Image.fromarray(pixels(256, 256)).save(sub / "progressive.jpg", progressive=True)
    Image.fromarray(pixels(256, 256)).convert("L").save(sub / "grey.png")
    Image.fromarray(pixels(256, 256)).convert("1").save(sub / "bilevel.png")
    Image.fromarray(pixels(256, 256)).save(sub / "plain.bmp")
    for name in os.listdir(sub):
        (sub / name).with_suffix(".caption").write_text("sks")


@case("works", run=lambda folder: _exif_sizes(folder))
def exif_rotations(folder: Path) -> None:
    sub = subset_dir(folder)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels(384, 256)).save(sub / f"o{orientation}.jpg", exif=exif)
        (sub / f"o{orientation}.caption").write_text("sks")


def _exif_sizes(folder: Path) -> list[Problem]:
    ds = load(folder, resolution=320)
    for i in range(len(ds)):
        name = Path(ds.catalog.paths[i]).stem
        upright = (256, 384) if int(name[1:]) >= 5 else (384, 256)
        got = (int(ds.catalog.widths[i]), int(ds.catalog.heights[i]))
        if got != upright:
            raise AssertionError(f"{name}: catalog size {got}, upright size {upright}")
    for batch in stoker.make_loader(ds, workers=0, monitor=False):
        h, w = batch["images"].shape[-2:]
        bucket = tuple(int(v) for v in batch["target_sizes_hw"][0])
        if (h, w) != bucket:
            raise AssertionError(f"pixels {h}x{w} in bucket {bucket}")
    return list(ds.report.problems)


@case("skip:bad_image", match="GIF data in a file named .png")
def animated_gif_named_png(folder: Path) -> None:
    sub = good(folder)
    frames = [Image.fromarray(pixels(256, 256, seed=s)).convert("P") for s in range(3)]
    frames[0].save(sub / "anim.png", format="GIF", save_all=True, append_images=frames[1:])


@case("skip:bad_image", match="TIFF data in a file named .jpg")
def tiff_named_jpg(folder: Path) -> None:
    sub = good(folder)
    Image.fromarray(pixels(256, 256)).save(sub / "scan.jpg", format="TIFF")


@case("skip:bad_image", match="PNG data in a file named .jpg")
def png_named_jpg(folder: Path) -> None:
    sub = good(folder)
    Image.fromarray(pixels(256, 256)).save(sub / "misnamed.jpg", format="PNG")


@case("skip:bad_image", match="not an image")
def eps_named_jpg(folder: Path) -> None:
    sub = good(folder)
    # An EPS header: with Ghostscript installed, Pillow would run gs on it if asked to try EPS.
    (sub / "vector.jpg").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 256 256\nshowpage\n%%EOF\n"
    )


@case("skip:bad_image", match="decompression bomb")
def decompression_bomb(folder: Path) -> None:
    sub = good(folder)
    # A 1-bit PNG of 30000 x 30000 zeros: 900 million pixels in a file of a few hundred kB.
    Image.new("1", (30000, 30000)).save(sub / "bomb.png")


# --- paths that escape, files that are not files -------------------------------------------------


def _metadata(folder: Path, entries: dict[str, Any]) -> None:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(256, 256)).save(images / "a.jpg")
    (folder / "meta.json").write_text(json.dumps({"a": {"caption": "sks"}, **entries}))


def load_metadata_source(folder: Path) -> list[Problem]:
    return list(
        load(folder, source=folder / "meta.json", image_dir=folder / "images").report.problems
    )


@case("skip:outside_root", match="outside image_dir", run=load_metadata_source)
def metadata_key_climbs_out(folder: Path) -> None:
    secret = folder / "private"
    secret.mkdir()
    Image.fromarray(pixels(256, 256)).save(secret / "secret_photo.jpg")
    _metadata(folder, {"../private/secret_photo": {"caption": "stolen"}})


@case("skip:missing_image", match="NUL byte", run=load_metadata_source)
def metadata_key_with_nul(folder: Path) -> None:
    _metadata(folder, {"a\u0000b": {"caption": "x"}})


@case("works", run=load_metadata_source)
def metadata_with_bom(folder: Path) -> None:
    _metadata(folder, {})
    meta = folder / "meta.json"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())


@case("skip:outside_root", match="symlink leads outside")
def symlink_out_of_dataset(folder: Path) -> None:
    sub = good(folder)
    outside = folder / "elsewhere"
    outside.mkdir()
    Image.fromarray(pixels(256, 256)).save(outside / "private.jpg")
    (sub / "link.jpg").symlink_to(outside / "private.jpg")


@case("works")
def symlink_inside_dataset(folder: Path) -> None:
    sub = good(folder)
    (sub / "alias.jpg").symlink_to(sub / "good0.jpg")


@case("skip:missing_image", match="dangling symlink")
def symlink_dangling(folder: Path) -> None:
    sub = good(folder)
    (sub / "gone.jpg").symlink_to(sub / "never-was.jpg")


@case("skip:missing_image", match="symlink loop")
def symlink_loop_file(folder: Path) -> None:
    sub = good(folder)
    (sub / "a.jpg").symlink_to(sub / "b.jpg")
    (sub / "b.jpg").symlink_to(sub / "a.jpg")


@case("works")
def symlink_loop_folder(folder: Path) -> None:
    sub = good(folder)
    (sub / "loop").symlink_to(sub)  # a folder inside the subset that leads back to it


@case("skip:not_regular_file", match="not a regular file")
def fifo_image(folder: Path) -> None:
    sub = good(folder)
    os.mkfifo(sub / "pipe.jpg")


@case("skip:bad_caption", match="FIFO")
def fifo_caption(folder: Path) -> None:
    sub = good(folder)
    (sub / "good0.caption").unlink()
    os.mkfifo(sub / "good0.caption")


@case("skip:outside_root", match="symlink leads outside")
def caption_symlink_to_dev_zero(folder: Path) -> None:
    sub = good(folder)
    (sub / "good0.caption").unlink()
    (sub / "good0.caption").symlink_to("/dev/zero")


@case("skip:outside_root", match="symlink leads outside")
def image_symlink_to_dev_zero(folder: Path) -> None:
    sub = good(folder)
    (sub / "zero.jpg").symlink_to("/dev/zero")


@case("skip:bad_caption", match="over the limit")
def caption_too_large(folder: Path) -> None:
    sub = good(folder)
    (sub / "good0.caption").write_text("sks " * 300_000)


# --- caches ----------------------------------------------------------------------------------------

_CACHE = ".stoker-scan-cache.json"


def load_with_cache(folder: Path) -> list[Problem]:
    return list(load(folder, cache_info=True).report.problems)


def _victim_unchanged(folder: Path) -> list[Problem]:
    victim = folder / "victim.txt"
    problems = load_with_cache(folder)
    if victim.read_text() != "precious":
        raise AssertionError("the scan cache was written through a planted symlink")
    cache = folder / "train" / "1_sks" / _CACHE
    if cache.is_symlink() or not cache.is_file():
        raise AssertionError("the scan cache is not a regular file of its own")
    return problems


@case("works", run=_victim_unchanged, warns="stoker never reads or writes through one")
def scan_cache_symlink_planted(folder: Path) -> None:
    sub = good(folder)
    victim = folder / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o600)
    (sub / _CACHE).symlink_to(victim)


def _corrupt_cache(content: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        sub = good(folder)
        (sub / _CACHE).write_text(content)

    return build


for _name, _content in {
    "scan_cache_not_json": "{not json",
    "scan_cache_list": "[1, 2, 3]",
    "scan_cache_entries_list": json.dumps({"version": 2, "entries": [1]}),
    "scan_cache_wrong_types": json.dumps(
        {"version": 2, "entries": {"good0.jpg": ["x", None, 1, 2, 3, 4], "good1.jpg": 5}}
    ),
    "scan_cache_huge_numbers": json.dumps(
        {"version": 2, "entries": {"good0.jpg": [10**30, 1, 1, 1, -5, 10**40]}}
    ),
    "scan_cache_deep_nesting": "[" * 100_000 + "]" * 100_000,
}.items():
    _build = _corrupt_cache(_content)
    _build.__name__ = _name
    CASES[_name] = Case(_build, load_with_cache, "works", warns="ignored the scan cache")


@case("works", run=load_with_cache, warns="could not write the scan cache")
def scan_cache_cannot_be_written(folder: Path) -> None:
    sub = good(folder)
    (sub / _CACHE).mkdir()  # the name is taken by a folder: no file can be written there


@case("skip:missing_image", match="no image file was found", run=load_metadata_source)
def metadata_key_without_image(folder: Path) -> None:
    _metadata(folder, {"ghost": {"caption": "x"}})


@case("works", run=lambda folder: _fifo_cache(folder), warns="FIFO")
def scan_cache_fifo(folder: Path) -> None:
    sub = good(folder)
    os.mkfifo(sub / _CACHE)


def _fifo_cache(folder: Path) -> list[Problem]:
    return load_with_cache(folder)


def _rewritten_same_size_and_mtime(folder: Path) -> list[Problem]:
    sub = folder / "train" / "1_sks"
    load_with_cache(folder)  # fills the cache: 384x256
    target = sub / "good0.png"
    before = target.stat()
    data = target.read_bytes()
    # Width and height swapped in the header (CRC fixed): same byte length, other size.
    start = data.index(b"IHDR")
    width, height = data[start + 4 : start + 8], data[start + 8 : start + 12]
    header = b"IHDR" + height + width + data[start + 12 : start + 17]
    rotated = data[:start] + header + zlib.crc32(header).to_bytes(4, "big") + data[start + 21 :]
    target.write_bytes(rotated)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    ds = load(folder, cache_info=True)
    index = [Path(ds.catalog.paths[i]).name for i in range(len(ds))].index("good0.png")
    got = (int(ds.catalog.widths[index]), int(ds.catalog.heights[index]))
    if got != (256, 384):
        raise AssertionError(f"scan cache kept the old size {got} of a rewritten file")
    return []


@case("works", run=_rewritten_same_size_and_mtime)
def scan_cache_same_size_and_mtime(folder: Path) -> None:
    sub = subset_dir(folder)
    Image.fromarray(pixels(384, 256)).save(sub / "good0.png")
    (sub / "good0.caption").write_text("sks")


# --- the truth at decode time --------------------------------------------------------------------


def _truncated_jpeg(path: Path, size: tuple[int, int]) -> None:
    Image.fromarray(pixels(*size, seed=7)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@case("skip:decode_failed", match="truncated", run=load_and_iterate)
def truncated_jpeg_alone_in_its_bucket(folder: Path) -> None:
    sub = good(folder, count=3)
    _truncated_jpeg(sub / "cut.jpg", (384, 192))  # the only image of its bucket
    (sub / "cut.caption").write_text("sks")


@case("error:DatasetError", match="cut.jpg", run=lambda f: load_and_iterate(f, on_error="raise"))
def truncated_jpeg_on_error_raise(folder: Path) -> None:
    sub = good(folder, count=3)
    _truncated_jpeg(sub / "cut.jpg", (256, 256))


def _changed_after_scan(folder: Path) -> list[Problem]:
    ds = load(folder)
    sub = folder / "train" / "1_sks"
    replace_file(sub / "good0.jpg", Image.fromarray(pixels(512, 128)), format="JPEG")
    for batch in stoker.make_loader(ds, workers=0, monitor=False):
        for key, size in zip(batch["image_keys"], batch["original_sizes_hw"], strict=True):
            if key.endswith("good0.jpg"):
                raise AssertionError(f"a changed file was used as if {tuple(size.tolist())}")
    return list(ds.report.problems)


@case("skip:size_changed", match="size changed", run=_changed_after_scan)
def image_changed_after_scan(folder: Path) -> None:
    good(folder, count=3)


@case("skip:size_changed", match="size changed", run=lambda f: _metadata_iterate(f))
def metadata_image_size_lies(folder: Path) -> None:
    images = folder / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(pixels(256, 256)).save(images / f"{name}.jpg")
    (folder / "meta.json").write_text(
        json.dumps(
            {
                "a": {"caption": "sks", "image_size": [1024, 256]},
                "b": {"caption": "sks", "image_size": [256, 256]},
            }
        )
    )


def _metadata_iterate(folder: Path) -> list[Problem]:
    ds = load(folder, source=folder / "meta.json", image_dir=folder / "images")
    for _ in stoker.make_loader(ds, workers=0, monitor=False):
        pass
    return list(ds.report.problems)


# --- configs, resume states, timeouts ------------------------------------------------------------


def _toml(folder: Path, body: str) -> None:
    good(folder)
    (folder / "dataset.toml").write_text(body)


def load_toml(folder: Path) -> list[Problem]:
    return list(load(folder, source=folder / "dataset.toml", resolution=None).report.problems)


_SUBSET = '[[datasets.subsets]]\nimage_dir = "train/1_sks"\n'


@case("error:ConfigError", match="dataset.toml", run=load_toml)
def min_bucket_reso_above_max(folder: Path) -> None:
    _toml(
        folder,
        f"[[datasets]]\nresolution = 512\nmin_bucket_reso = 1024\nmax_bucket_reso = 512\n{_SUBSET}",
    )


@case("error:ConfigError", match="multiple of", run=load_toml)
def resolution_not_multiple_of_8(folder: Path) -> None:
    _toml(folder, f"[[datasets]]\nresolution = 500\n{_SUBSET}")


@case("error:ConfigError", match="max_train_steps", run=load_toml)
def token_warmup_fraction_without_max_steps(folder: Path) -> None:
    _toml(folder, f"[[datasets]]\nresolution = 256\n{_SUBSET}token_warmup_step = 0.5\n")


def _resume(
    state_change: dict[str, Any], other_dataset: bool = False
) -> Callable[[Path], list[Problem]]:
    def run(folder: Path) -> list[Problem]:
        ds = load(folder)
        loader = stoker.make_loader(ds, workers=0, monitor=False)
        state = loader.state_dict()
        state.update(state_change)
        if other_dataset:
            sub = folder / "train" / "1_sks"
            for i in range(2):  # same count, same sizes, same layout: other images
                Image.fromarray(pixels(256, 256, seed=50 + i)).save(sub / f"good{i}.jpg")
                os.rename(sub / f"good{i}.jpg", sub / f"other{i}.jpg")
                os.rename(sub / f"good{i}.caption", sub / f"other{i}.caption")
            loader = stoker.make_loader(load(folder), workers=0, monitor=False)
        loader.load_state_dict(state)
        return []

    return run


for _name, _change in {
    "resume_batches_done_none": {"batches_done": None},
    "resume_batches_done_string": {"batches_done": "3"},
    "resume_batches_done_float": {"batches_done": 1.5},
    "resume_epoch_absurd": {"epoch": 10**30},
    "resume_epoch_bool": {"epoch": True},
    "resume_seed_string": {"seed": "0"},
}.items():
    CASES[_name] = Case(good, _resume(_change), "error:ValueError", "sampler state")
CASES["resume_other_dataset_same_layout"] = Case(
    good, _resume({}, True), "error:ValueError", "different run (dataset"
)


class _SlowDataset(stoker.StokerDataset):
    def __getitems__(self, keys: Any) -> Any:
        time.sleep(3)
        return super().__getitems__(keys)


def _timeout(folder: Path) -> list[Problem]:
    ds = load(folder)
    ds.__class__ = _SlowDataset
    loader = stoker.make_loader(ds, workers=1, timeout=1, monitor=False)
    for _ in loader:
        pass
    return []


@case("error:LoaderTimeout", match="batch", run=_timeout)
def loader_timeout(folder: Path) -> None:
    good(folder)


# --- signals -------------------------------------------------------------------------------------


def _sigint_mid_epoch(folder: Path) -> list[Problem]:
    import multiprocessing

    ds = load(folder)
    loader = stoker.make_loader(ds, workers=2, monitor=False)
    try:
        for _ in loader:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        raise AssertionError("SIGINT did not stop the epoch")
    except KeyboardInterrupt:
        pass
    del loader
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    if multiprocessing.active_children():
        raise AssertionError(f"workers left behind: {multiprocessing.active_children()}")
    return []


@case("works", run=_sigint_mid_epoch)
def sigint_mid_epoch(folder: Path) -> None:
    good(folder, count=8)


def _worker_killed(folder: Path) -> list[Problem]:
    ds = load(folder)
    loader = stoker.make_loader(ds, workers=2, monitor=False)
    for _ in loader:
        os.kill(loader.worker_pids()[0], signal.SIGKILL)
        time.sleep(0.5)
    return []


@case("error:WorkerFailed", match="SIGKILL", run=_worker_killed)
def worker_killed_mid_epoch(folder: Path) -> None:
    good(folder, count=16)


# --- folders -------------------------------------------------------------------------------------


@case("works")
def repeat_folder_symlink_loop(folder: Path) -> None:
    good(folder)
    (folder / "train" / "2_loop").symlink_to(folder / "train" / "2_loop")


@case("error:DatasetError", match="image_dir", run=load_toml)
def image_dir_symlink_loop(folder: Path) -> None:
    _toml(folder, '[[datasets]]\nresolution = 256\n[[datasets.subsets]]\nimage_dir = "loop"\n')
    (folder / "loop").symlink_to(folder / "loop")


def _as_nobody(folder: Path) -> list[Problem]:
    """Load as user nobody (root reads anything), in a child process; its outcome is ours."""
    import shutil

    outside = Path((folder / "where").read_text())
    try:
        return _load_as_nobody(outside)
    finally:
        for path in outside.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(outside)


def _load_as_nobody(folder: Path) -> list[Problem]:
    import subprocess
    import sys

    code = (
        "import os, sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import cases, stoker\n"
        "from PIL import Image; Image.init()\n"
        "os.setgid(65534); os.setuid(65534)  # after the imports: nobody cannot read root's home\n"
        "try:\n"
        f"    ds = cases.load(cases.Path({str(folder)!r}))\n"
        "    print(json.dumps(['ok', [[p.kind, p.reason] for p in ds.report.problems]]))\n"
        "except stoker.StokerError as err:\n"
        "    print(json.dumps(['error', type(err).__name__, str(err)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if not done.stdout.strip():
        raise AssertionError(f"exit {done.returncode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result[0] == "error":
        raise getattr(stoker, result[1])(result[2])
    return [Problem(path="", reason=reason, kind=kind) for kind, reason in result[1]]


@case("error:DatasetError", match="permission denied", run=_as_nobody)
def unreadable_subset_folder(folder: Path) -> None:
    # Built in a folder of its own that nobody can reach (pytest's temp root is private to root
    # and re-locked by every pytest run); _as_nobody removes it.
    outside = Path(tempfile.mkdtemp(prefix="stoker-hostile-"))
    outside.chmod(0o755)
    (folder / "where").write_text(str(outside))
    good(outside)
    locked = outside / "train" / "1_locked"
    locked.mkdir()
    Image.fromarray(pixels(256, 256)).save(locked / "x.jpg")
    locked.chmod(0o000)


# --- the everyday bad files ------------------------------------------------------------------


@case("skip:bad_image", match="zero-byte")
def zero_byte_image(folder: Path) -> None:
    (good(folder) / "empty.jpg").write_bytes(b"")


@case("skip:bad_image", match="not an image")
def text_named_png(folder: Path) -> None:
    (good(folder) / "notes.png").write_text("this is not an image")


@case("skip:bad_image", match="truncated")
def png_header_cut_short(folder: Path) -> None:
    sub = good(folder)
    Image.fromarray(pixels(256, 256)).save(sub / "cut.png")
    (sub / "cut.png").write_bytes((sub / "cut.png").read_bytes()[:20])


@case(
    "skip:too_small",
    match="shorter than bucket_reso_steps",
    run=lambda f: list(load(f, enable_bucket=True, bucket_no_upscale=True).report.problems),
)
def image_too_small_for_any_bucket(folder: Path) -> None:
    # Without upscaling, a side under bucket_reso_steps (64) fits no bucket.
    Image.fromarray(pixels(16, 200)).save(good(folder) / "sliver.jpg")


@case("skip:bad_caption", match="not UTF-8")
def caption_not_utf8(folder: Path) -> None:
    (good(folder) / "good0.caption").write_bytes("caf\u00e9".encode("latin-1"))


@case("skip:bad_caption", match="empty")
def caption_empty(folder: Path) -> None:
    (good(folder) / "good0.caption").write_text("  \n")


def _no_class_tokens(folder: Path) -> list[Problem]:
    return list(load(folder, source=folder / "dataset.toml", resolution=None).report.problems)


@case("skip:missing_caption", match="no caption file", run=_no_class_tokens)
def caption_missing_without_class_tokens(folder: Path) -> None:
    _toml(folder, f"[[datasets]]\nresolution = 256\n{_SUBSET}")
    (folder / "train" / "1_sks" / "good0.caption").unlink()


@case("error:ConfigError", match="did you mean", run=load_toml)
def config_unknown_key(folder: Path) -> None:
    _toml(folder, f"[[datasets]]\nresolution = 256\n{_SUBSET}num_repeat = 2\n")
