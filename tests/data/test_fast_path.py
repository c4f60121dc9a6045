"""The fast per-image path (issue #11): libjpeg-turbo DCT scaling, torch resize, one-pass float.

Files are real JPEG/PNG files written with Pillow. The Pillow fallback is tested by setting the
decoder to ``None``, which is exactly what a missing simplejpeg leaves.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stoker
from stoker.data import buffers as buffers_module
from stoker.data import dataset as dataset_module
from stoker.data import images
from stoker.data.images import (
    ImageProblem,
    decode_image,
    decode_scaled,
    fast_jpeg_decoder,
    resize_crop,
    torch_filter,
)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour with hard-edged blocks, like tests/data/test_images.py's images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    field = np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    for _ in range(12):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        field[y : y + int(rng.integers(4, 60)), x : x + int(rng.integers(4, 60))] = rng.integers(
            0, 256, 3
        )
    return field


def save(tmp_path: Path, name: str, im: Image.Image, **params: object) -> Path:
    path = tmp_path / name
    im.save(path, **params)
    return path


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the libjpeg-turbo decoder and again with the Pillow fallback."""
    if request.param == "pillow":
        monkeypatch.setattr(images, "_turbo", None)
    return str(request.param)


def test_simplejpeg_is_the_decoder_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fast_jpeg_decoder().startswith("simplejpeg ")
    monkeypatch.setattr(images, "_turbo", None)
    assert fast_jpeg_decoder() == "pillow"


# --------------------------------------------------------------------------------------------------
# decode_scaled


@pytest.mark.parametrize(
    ("want", "expected_hw"),
    [
        ((500, 300), (300, 500)),  # 1/2
        ((250, 150), (150, 250)),  # 1/4
        ((125, 75), (75, 125)),  # 1/8
        ((126, 75), (150, 250)),  # one pixel more than 1/8 gives: 1/4
        ((501, 300), (600, 1000)),  # more than half: full size (no 3/8 .. 7/8 scales)
        ((2000, 2000), (600, 1000)),  # larger than the image: full size
    ],
)
def test_scale_is_the_smallest_power_of_two_that_covers(
    tmp_path: Path, decoder: str, want: tuple[int, int], expected_hw: tuple[int, int]
) -> None:
    path = save(tmp_path, "d.jpg", Image.fromarray(photo_like(1000, 600)), quality=90)
    out = decode_scaled(path, size_wh=want)
    assert out.shape == (*expected_hw, 3) and out.dtype == np.uint8


def test_odd_sizes_round_up_like_libjpeg(tmp_path: Path) -> None:
    # Pillow's draft (the fallback) picks by floor division and would decode this at 1/4.
    path = save(tmp_path, "odd.jpg", Image.fromarray(photo_like(1001, 603)), quality=90)
    assert decode_scaled(path, size_wh=(126, 76)).shape == (76, 126, 3)  # ceil(1001/8), ceil(603/8)


def test_scaled_decode_is_close_to_a_full_decode_then_resize(tmp_path: Path, decoder: str) -> None:
    path = save(tmp_path, "c.jpg", Image.fromarray(photo_like(1600, 1200, seed=5)), quality=90)
    kwargs = {"resized_wh": (400, 300), "bucket_wh": (384, 256), "random_crop": False}
    exact, _ = resize_crop(decode_image(path), rng=np.random.default_rng(0), **kwargs)
    fast, _ = resize_crop(
        decode_scaled(path, size_wh=(400, 300)), rng=np.random.default_rng(0), fast=True, **kwargs
    )
    diff = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 6


def test_full_scale_decode_equals_pillow(tmp_path: Path) -> None:
    # Same libjpeg-turbo algorithm (islow IDCT, fancy upsampling) in both: the same pixels.
    path = save(tmp_path, "f.jpg", Image.fromarray(photo_like(300, 200)), quality=90)
    assert np.array_equal(decode_scaled(path, size_wh=(300, 200)), decode_image(path))


def test_greyscale_jpeg_is_replicated_to_rgb(tmp_path: Path, decoder: str) -> None:
    grey = photo_like(320, 240)[..., 0]
    path = save(tmp_path, "g.jpg", Image.fromarray(grey), quality=90)
    out = decode_scaled(path, size_wh=(160, 120))
    assert out.shape == (120, 160, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.array_equal(out, decode_image(path, draft_size=(160, 120)))


def test_alpha_on_a_jpeg_is_opaque(tmp_path: Path, decoder: str) -> None:
    path = save(tmp_path, "a.jpg", Image.fromarray(photo_like(320, 240)), quality=90)
    out = decode_scaled(path, size_wh=(160, 120), alpha=True)
    assert out.shape == (120, 160, 4) and (out[..., 3] == 255).all()
    assert np.array_equal(out[..., :3], decode_scaled(path, size_wh=(160, 120)))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_as_decode_image(tmp_path: Path, decoder: str, orientation: int) -> None:
    path = save(
        tmp_path,
        f"o{orientation}.jpg",
        Image.fromarray(photo_like(400, 200)),
        quality=90,
        exif=exif_with_orientation(orientation),
    )
    want = (100, 50) if orientation < 5 else (50, 100)  # upright request
    got = decode_scaled(path, size_wh=want)
    assert got.shape[:2] == (want[1], want[0])
    assert np.array_equal(got, decode_image(path, draft_size=want))
    unrotated = decode_scaled(path, size_wh=(100, 50), exif=False)
    assert unrotated.shape == (50, 100, 3)


def test_cmyk_and_png_go_through_pillow(tmp_path: Path) -> None:
    cmyk = save(tmp_path, "c.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), quality=95)
    assert np.array_equal(
        decode_scaled(cmyk, size_wh=(32, 32)), decode_image(cmyk, draft_size=(32, 32))
    )
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :15, 3] = 255
    png = save(tmp_path, "a.png", Image.fromarray(rgba))
    assert np.array_equal(decode_scaled(png, size_wh=(5, 5), alpha=True), rgba)
    g16 = save(tmp_path, "g16.png", Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)))
    assert decode_scaled(g16, size_wh=(1, 1))[0, :, 0].tolist() == [0, 255]


def test_bad_jpegs_get_the_same_reasons(tmp_path: Path, decoder: str) -> None:
    full = save(tmp_path, "full.jpg", Image.fromarray(photo_like(400, 300)), quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    with pytest.raises(ImageProblem) as excinfo:
        decode_scaled(cut, size_wh=(100, 75))
    assert excinfo.value.reason == "truncated image data"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageProblem, match="zero-byte file"):
        decode_scaled(empty, size_wh=(10, 10))


def test_extraneous_bytes_are_accepted_as_pillow_accepts_them(tmp_path: Path) -> None:
    # libjpeg warns ("extraneous bytes before marker"); strict simplejpeg would refuse the file.
    data = save(tmp_path, "x.jpg", Image.fromarray(photo_like(200, 100)), quality=90).read_bytes()
    end = data.rindex(b"\xff\xd9")
    path = tmp_path / "junk.jpg"
    path.write_bytes(data[:end] + b"\x00\x00" + data[end:])
    assert decode_scaled(path, size_wh=(200, 100)).shape == (100, 200, 3)


# --------------------------------------------------------------------------------------------------
# resize_crop(fast=True)


@pytest.mark.parametrize(
    ("interpolation", "src", "dst", "mode"),
    [
        (None, (400, 300), (200, 150), "bilinear"),
        (None, (100, 80), (200, 160), "bicubic"),
        (None, (100, 300), (200, 150), "bicubic"),  # one side grows: sd-scripts' lanczos
        ("area", (400, 300), (200, 150), "bilinear"),
        ("linear", (400, 300), (200, 150), "bilinear"),
        ("cubic", (400, 300), (200, 150), "bicubic"),
        ("lanczos", (400, 300), (200, 150), None),
        ("box", (400, 300), (200, 150), None),
        ("nearest", (400, 300), (200, 150), None),
    ],
)
def test_torch_filter(
    interpolation: str | None, src: tuple[int, int], dst: tuple[int, int], mode: str | None
) -> None:
    assert torch_filter(interpolation, src, dst) == mode


@pytest.mark.parametrize("random_crop", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_fast_resize_crops_the_same_window(random_crop: bool, flip: bool) -> None:
    img = photo_like(333, 250, seed=2)
    kwargs = {"resized_wh": (190, 143), "bucket_wh": (128, 128), "random_crop": random_crop}
    exact, offset = resize_crop(img, rng=np.random.default_rng(4), flip=flip, **kwargs)
    fast, fast_offset = resize_crop(
        img, rng=np.random.default_rng(4), flip=flip, fast=True, **kwargs
    )
    assert offset == fast_offset and fast.shape == exact.shape == (128, 128, 3)
    assert fast.flags.writeable
    diff = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
    assert diff.mean() < 1.0  # Pillow's and torch's antialiased bilinear


def test_fast_resize_keeps_straight_alpha() -> None:
    rgba = np.zeros((100, 120, 4), np.uint8)
    rgba[..., :3] = (30, 60, 90)
    rgba[:50, :, 3] = 255
    out, _ = resize_crop(
        rgba, resized_wh=(60, 50), bucket_wh=(60, 50), random_crop=False,
        rng=np.random.default_rng(0), fast=True,
    )  # fmt: skip
    assert out.shape == (50, 60, 4)
    assert (out[..., :3] == (30, 60, 90)).all()
    assert (out[:24, :, 3] == 255).all() and (out[26:, :, 3] == 0).all()


def test_fast_resize_is_the_same_for_any_thread_count() -> None:
    img = photo_like(640, 480, seed=7)
    kwargs = {"resized_wh": (300, 225), "bucket_wh": (256, 192), "random_crop": False}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = resize_crop(img, rng=np.random.default_rng(0), fast=True, **kwargs)
        torch.set_num_threads(2)
        two, _ = resize_crop(img, rng=np.random.default_rng(0), fast=True, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(one, two)


def test_names_torch_does_not_have_stay_exact() -> None:
    img = photo_like(333, 250, seed=2)
    kwargs = {"resized_wh": (190, 143), "bucket_wh": (128, 128), "random_crop": False}
    for name in ("lanczos", "box", "nearest"):
        exact, _ = resize_crop(img, rng=np.random.default_rng(0), interpolation=name, **kwargs)
        fast, _ = resize_crop(
            img, rng=np.random.default_rng(0), interpolation=name, fast=True, **kwargs
        )
        assert np.array_equal(exact, fast)


# --------------------------------------------------------------------------------------------------
# One-pass float conversion and uint8 transit


def test_planes_are_bitwise_the_float_conversion() -> None:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (40, 56, 4), dtype=np.uint8) for _ in range(3)]
    views = [p[:, ::-1, :3] for p in pixels]  # strided views, as the fast path hands them over
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(views).transpose(0, 3, 1, 2)))
    as_uint8 = dataset_module._planes(views, float_images=False)
    as_float = dataset_module._planes(views, float_images=True)
    assert as_uint8.dtype == torch.uint8 and torch.equal(as_uint8, stacked)
    assert as_float.dtype == torch.float32 and torch.equal(
        as_float, stoker.to_float_images(stacked)
    )
    assert torch.equal(dataset_module._uint8_to_float(as_uint8), as_float)
    assert float(as_float.min()) >= -1.0 and float(as_float.max()) <= 1.0
    everything = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    converted = dataset_module._uint8_to_float(everything)
    assert converted[0, 0, 0, 0] == -1.0 and converted[0, 0, -1, -1] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("transit", ["blocks", "uint8"])
def test_workers_send_uint8_and_the_loop_receives_the_same_floats(
    tmp_path: Path, transit: str
) -> None:
    """Float batches sent as uint8 (converted on arrival) or as float in reused blocks (lent
    as they are) equal the batches made in the main process, tensor for tensor."""
    folder = tmp_path / "1_set"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(photo_like(640, 480, seed=i)).save(folder / f"{i}.jpg", quality=90)
        (folder / f"{i}.txt").write_text("a photo\n", encoding="utf-8")
    ds = stoker.load_dataset(tmp_path, resolution=256, progress=lambda done, total: None)
    ds.float_transit = transit  # type: ignore[assignment]

    def batches(workers: int, dataset: Any = ds) -> tuple[Any, list[dict[str, Any]]]:
        loader = stoker.make_loader(dataset, seed=3, shuffle=True, workers=workers, budget=2)
        return loader, list(loader)

    in_process, expected = batches(0)
    with_workers, got = batches(2)
    assert not in_process.dataset.uint8_in_transit and not in_process.dataset.small_in_transit
    sent = with_workers.dataset
    blocks = transit == "blocks" and buffers_module.reused_shared_blocks()
    assert (sent.float_in_blocks, sent.uint8_in_transit) == (blocks, not blocks)
    assert sent.output == "float"
    assert with_workers.dataset.small_in_transit
    assert all(b["images"].dtype == torch.float32 for b in got)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert list(mine) == list(theirs)  # the same keys in the same order
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):  # every tensor: dtype, shape and values
                assert isinstance(mine[key], torch.Tensor) and mine[key].dtype == value.dtype
                assert torch.equal(mine[key], value), key
            else:
                assert mine[key] == value, key
    # each flag on its own: a twin that sends small tensors as tensors still gets float images
    plain = object.__new__(_TensorsInTransit)
    plain.__dict__.update(ds.with_seed(3).__dict__)  # the loader's seed: no re-seeded copy
    _, got_plain = batches(2, plain)
    assert all(b["images"].dtype == torch.float32 for b in got_plain)
    for mine, theirs in zip(got_plain, expected, strict=True):
        assert torch.equal(mine["images"], theirs["images"])
    small = stoker.load_dataset(tmp_path, resolution=256, output="uint8", progress=None)
    twin = small.for_workers()
    assert not twin.uint8_in_transit and twin.small_in_transit  # images already uint8
    _, uint8_in_process = batches(0, small)
    _, uint8_with_workers = batches(2, small)
    for mine, theirs in zip(uint8_with_workers, uint8_in_process, strict=True):
        assert torch.equal(mine["images"], theirs["images"]) and mine["images"].dtype == torch.uint8
        assert torch.equal(mine["crop_top_lefts"], theirs["crop_top_lefts"])


def test_small_tensors_travel_inside_the_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "1_set"
    folder.mkdir()
    Image.fromarray(photo_like(320, 240)).save(folder / "a.jpg", quality=90)
    (folder / "a.txt").write_text("a photo\n", encoding="utf-8")
    ds = stoker.load_dataset(tmp_path, resolution=256, progress=None)
    key = (0, 0, 0, 0)
    twin = ds.for_workers()
    sent = twin.__getitems__([key])
    small = [k for k, v in sent.items() if isinstance(v, dataset_module._Inline)]
    assert set(small) == {
        "loss_weights",
        "original_sizes_hw",
        "crop_top_lefts",
        "target_sizes_hw",
        "network_multipliers",
    }
    in_transit = torch.uint8 if twin.uint8_in_transit else torch.float32
    assert isinstance(sent["images"], torch.Tensor) and sent["images"].dtype == in_transit
    arrived = ds.for_workers().arrive(pickle.loads(pickle.dumps(sent)))
    expected = ds[0]
    for name in small:
        assert arrived[name].dtype == expected[name].dtype
        assert torch.equal(arrived[name], expected[name])
    assert torch.equal(arrived["images"], expected["images"])
    assert ds.arrive(expected) is expected  # the main process's own batches pass unchanged


class _TensorsInTransit(stoker.StokerDataset):
    """Small tensors cross the worker queue as tensors (as before issue #11's second session)."""

    def for_workers(self) -> stoker.StokerDataset:
        twin = super().for_workers()
        twin.small_in_transit = False
        return twin


class _PlanesInWorker(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Reports whether `_planes` built its batch in shared memory where it ran."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[bool, torch.Tensor]:
        pixels = np.full((4, 5, 3), index, np.uint8)
        batch = dataset_module._planes([pixels], float_images=bool(index))
        return batch.is_shared(), batch


@pytest.mark.slow
def test_worker_batches_are_built_in_shared_memory() -> None:
    loader = torch.utils.data.DataLoader(_PlanesInWorker(), batch_size=None, num_workers=1)
    results = list(loader)
    assert [shared for shared, _ in results] == [True, True]
    assert results[0][1].dtype == torch.uint8 and results[1][1].dtype == torch.float32
    assert float(results[1][1].max()) == pytest.approx(1 / 127.5 - 1)
    assert not _PlanesInWorker()[0][0]  # in the main process: ordinary memory


def test_expect_size_is_checked_before_decoding(tmp_path: Path, decoder: str) -> None:
    path = save(tmp_path, "s.jpg", Image.fromarray(photo_like(320, 240)), quality=90)
    assert decode_scaled(path, size_wh=(160, 120), expect_size=(320, 240)).shape == (120, 160, 3)
    with pytest.raises(ImageProblem, match="size changed"):
        decode_scaled(path, size_wh=(160, 120), expect_size=(300, 240))


def test_the_workers_twin_keeps_a_subclass(tmp_path: Path) -> None:
    class Custom(stoker.StokerDataset):
        pass

    folder = tmp_path / "1_set"
    folder.mkdir()
    Image.fromarray(photo_like(320, 240)).save(folder / "a.jpg", quality=90)
    (folder / "a.txt").write_text("a photo\n", encoding="utf-8")
    ds = stoker.load_dataset(tmp_path, resolution=256, progress=None)
    ds.__class__ = Custom
    twin = ds.for_workers()
    assert type(twin) is Custom and not ds.uint8_in_transit and not ds.float_in_blocks
    assert twin.uint8_in_transit or twin.float_in_blocks
