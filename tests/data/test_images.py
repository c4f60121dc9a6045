"""Tests for stoker.data.images on real files written with Pillow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from stoker.data import images
from stoker.data.images import (
    INTERPOLATIONS,
    ImageProblem,
    alpha_to_mask,
    choose_filter,
    color_aug,
    conditioning_crop_top_left,
    decode_image,
    face_crop,
    open_image,
    parse_face_info,
    read_image_size,
    resize_crop,
    to_tensor,
)

# --------------------------------------------------------------------------------------------------
# Helpers that make images


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour field with a few hard-edged blocks: photo-like enough for resampling checks."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    field = np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    for _ in range(12):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        field[y : y + int(rng.integers(4, 60)), x : x + int(rng.integers(4, 60))] = rng.integers(
            0, 256, 3
        )
    return field


def coordinate_image(width: int, height: int) -> np.ndarray:
    """Pixel (y, x) holds (y % 256, x % 256, (y // 256) * 16 + x // 256): every position is visible."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], axis=-1).astype(np.uint8)


def save(tmp_path: Path, name: str, im: Image.Image, **params: object) -> Path:
    path = tmp_path / name
    im.save(path, **params)
    return path


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def reason_of(excinfo: pytest.ExceptionInfo[ImageProblem]) -> str:
    return excinfo.value.reason


# --------------------------------------------------------------------------------------------------
# read_image_size and decode_image: formats


def test_jpeg_size_and_decode(tmp_path: Path) -> None:
    path = save(tmp_path, "a.jpg", Image.fromarray(photo_like(120, 80)), quality=95)
    assert read_image_size(path) == (120, 80)
    arr = decode_image(path)
    assert arr.shape == (80, 120, 3) and arr.dtype == np.uint8
    assert arr.flags.writeable and arr.flags.c_contiguous


def test_png_with_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :15, 3] = 255  # left half opaque, right half fully transparent
    path = save(tmp_path, "a.png", Image.fromarray(rgba))
    rgb = decode_image(path)
    # convert("RGB") semantics: alpha is dropped, colour under transparent pixels kept, no compositing.
    assert rgb.shape == (20, 30, 3)
    assert (rgb == (10, 200, 30)).all()
    assert np.array_equal(decode_image(path, alpha=True), rgba)


def test_palette_png_with_transparency_decodes_without_warning(tmp_path: Path) -> None:
    im = Image.new("P", (8, 4))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (4, 0, 8, 4))  # right half is palette index 1 (blue)
    path = save(tmp_path, "p.png", im, transparency=bytes([0, 128]))
    with Image.open(path) as check:
        assert isinstance(check.info["transparency"], bytes)
    rgb = decode_image(path)  # filterwarnings=error: Pillow's palette warning would fail this
    assert (rgb[:, :4] == (255, 0, 0)).all() and (rgb[:, 4:] == (0, 0, 255)).all()
    rgba = decode_image(path, alpha=True)
    assert (rgba[:, :4, 3] == 0).all() and (rgba[:, 4:, 3] == 128).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    arr = decode_image(path)
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (arr[..., 0] == arr[..., 2]).all()
    assert (decode_image(path, alpha=True)[..., 3] == 255).all()


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGB"])
def test_other_modes_become_rgb_or_rgba(tmp_path: Path, mode: str) -> None:
    path = save(tmp_path, f"m_{mode}.png", Image.new(mode, (5, 3)))
    assert decode_image(path).shape == (3, 5, 3)
    alpha = decode_image(path, alpha=True)
    assert alpha.shape == (3, 5, 4)
    if mode not in ("LA",):
        assert (alpha[..., 3] == 255).all()


def test_webp_lossless_round_trip(tmp_path: Path) -> None:
    pixels = photo_like(64, 48, seed=3)
    path = save(tmp_path, "a.webp", Image.fromarray(pixels), lossless=True)
    assert read_image_size(path) == (64, 48)
    assert np.array_equal(decode_image(path), pixels)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    path = save(tmp_path, "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    arr = decode_image(path)
    assert arr.shape == (16, 16, 3)
    assert np.abs(arr.astype(int) - (255, 0, 0)).max() <= 8  # red, within JPEG error


# --------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_6_swaps_size_and_rotates_pixels(tmp_path: Path) -> None:
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # left half red
    stored[:8, 32:] = (0, 255, 0)  # top right strip green
    path = save(
        tmp_path, "o6.jpg", Image.fromarray(stored), quality=95, exif=exif_with_orientation(6)
    )
    assert read_image_size(path) == (40, 64)
    assert read_image_size(path, exif=False) == (64, 40)
    upright = decode_image(path)
    raw = decode_image(path, exif=False)
    assert upright.shape == (64, 40, 3) and raw.shape == (40, 64, 3)
    # Orientation 6 means "rotate 90 degrees clockwise to display".
    assert np.array_equal(upright, np.rot90(raw, k=-1))
    # The stored left half (red) is now the top; the green strip is on the right edge.
    assert upright[:24, :, 0].mean() > 200 and upright[40:, 36:, 1].mean() > 200


def test_png_exif_orientation_is_read_from_the_header(tmp_path: Path) -> None:
    path = save(
        tmp_path, "o8.png", Image.fromarray(coordinate_image(30, 20)), exif=exif_with_orientation(8)
    )
    assert read_image_size(path) == (20, 30)
    assert decode_image(path).shape == (30, 20, 3)


def test_draft_size_is_upright_for_rotated_jpeg(tmp_path: Path) -> None:
    pixels = photo_like(800, 400)
    path = save(tmp_path, "o6.jpg", Image.fromarray(pixels), exif=exif_with_orientation(6))
    drafted = decode_image(path, draft_size=(100, 200))  # upright request: 100 wide, 200 tall
    assert drafted.shape == (200, 100, 3)  # scale 1/4 of the upright 400x800


# --------------------------------------------------------------------------------------------------
# Bad files


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    for call in (read_image_size, decode_image):
        with pytest.raises(ImageProblem) as excinfo:
            call(path)
        assert reason_of(excinfo) == "zero-byte file"
        assert excinfo.value.path == str(path) and str(path) in str(excinfo.value)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("just some text, not pixels\n")
    with pytest.raises(ImageProblem) as excinfo:
        read_image_size(path)
    assert reason_of(excinfo) == "not an image (cannot identify format)"


def test_png_cut_inside_header(tmp_path: Path) -> None:
    full = save(tmp_path, "full.png", Image.fromarray(photo_like(40, 30)))
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[:20])
    with pytest.raises(ImageProblem) as excinfo:
        read_image_size(path)
    assert reason_of(excinfo) in ("truncated image header", "truncated or corrupt image header")


def test_truncated_jpeg_has_a_size_but_does_not_decode(tmp_path: Path) -> None:
    full = save(tmp_path, "full.jpg", Image.fromarray(photo_like(200, 150)), quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    assert read_image_size(path) == (200, 150)  # the header is intact; pixels are checked on decode
    with pytest.raises(ImageProblem) as excinfo:
        decode_image(path)
    assert reason_of(excinfo) == "truncated image data"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    # Pillow errors above twice MAX_IMAGE_PIXELS (and only warns between 1x and 2x).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    for call in (read_image_size, decode_image):
        with pytest.raises(ImageProblem) as excinfo:
            call(path)
        assert reason_of(excinfo) == "decompression bomb: 10000 pixels exceeds limit 8000"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageProblem) as excinfo:
        read_image_size(tmp_path / "nope.jpg")
    assert reason_of(excinfo) == "unreadable: file not found"
    with pytest.raises(ImageProblem) as excinfo:
        decode_image(tmp_path)
    assert reason_of(excinfo) == "unreadable: is a directory"


_READ_AS_NOBODY = """
import os, sys
from stoker.data.images import ImageProblem, read_image_size
os.setgid(65534)
os.setuid(65534)  # root reads anything: drop to nobody so the permission bits count
try:
    read_image_size(sys.argv[1])
except ImageProblem as err:
    print(err.reason)
"""


def test_permission_denied(tmp_path: Path) -> None:
    path = save(tmp_path, "locked.png", Image.new("RGB", (4, 4)))
    path.chmod(0)
    tmp_path.chmod(0o755)
    try:
        if os.geteuid() == 0:
            out = subprocess.run(
                [sys.executable, "-c", _READ_AS_NOBODY, str(path)],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            assert out.stdout.strip() == "unreadable: permission denied"
        else:
            with pytest.raises(ImageProblem) as excinfo:
                read_image_size(path)
            assert reason_of(excinfo) == "unreadable: permission denied"
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------------------------------
# Draft (reduced-scale JPEG decoding)


def test_draft_keeps_both_sides_at_least_the_request(tmp_path: Path) -> None:
    path = save(tmp_path, "d.jpg", Image.fromarray(photo_like(1000, 600)), quality=90)
    for want, expected in [
        ((500, 300), (300, 500)),
        ((240, 150), (150, 250)),
        ((400, 100), (300, 500)),
    ]:
        drafted = decode_image(path, draft_size=want)
        assert drafted.shape[:2] == expected
        assert drafted.shape[1] >= want[0] and drafted.shape[0] >= want[1]
    assert decode_image(path, draft_size=(2000, 2000)).shape == (600, 1000, 3)


def test_draft_is_ignored_for_png(tmp_path: Path) -> None:
    path = save(tmp_path, "d.png", Image.fromarray(photo_like(200, 100)))
    assert np.array_equal(decode_image(path, draft_size=(50, 25)), decode_image(path))


def test_draft_path_is_close_to_the_full_decode(tmp_path: Path) -> None:
    """The fast path's error after the resize that follows, on a 1600x1200 JPEG cut to 400x300.

    Measured: mean absolute difference 0.53/255 here, 99th percentile 2 (0.33/255 for a 12 MP
    photo-like JPEG to 1 MP;
    2.6/255 when heavy sensor-like grain, sigma 25, dominates). The bound leaves room for other
    libjpeg builds.
    """
    path = save(tmp_path, "d.jpg", Image.fromarray(photo_like(1600, 1200, seed=5)), quality=90)
    rng = np.random.default_rng(0)
    kwargs = {"resized_wh": (400, 300), "bucket_wh": (384, 256), "random_crop": False, "rng": rng}
    plain, _ = resize_crop(decode_image(path), **kwargs)
    fast, _ = resize_crop(decode_image(path, draft_size=(400, 300)), **kwargs)
    diff = np.abs(plain.astype(np.int16) - fast.astype(np.int16))
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99) <= 6


# --------------------------------------------------------------------------------------------------
# Interpolation names and filters


def test_interpolation_names_are_sd_scripts_names() -> None:
    assert set(INTERPOLATIONS) == {
        "lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"
    }  # fmt: skip


def test_default_filter_rule() -> None:
    lanczos, box, bilinear = (
        Image.Resampling.LANCZOS,
        Image.Resampling.BOX,
        Image.Resampling.BILINEAR,
    )
    assert choose_filter(None, (1000, 1000), (400, 400)) == box  # area, shrinking 2.5x
    assert choose_filter(None, (1000, 1000), (700, 700)) == bilinear  # area, shrinking 1.4x
    assert choose_filter(None, (1000, 1000), (1200, 1200)) == lanczos  # growing
    assert choose_filter(None, (1000, 1000), (500, 1001)) == lanczos  # one side grows
    assert choose_filter("area", (1000, 1000), (499, 600)) == bilinear  # factor is the smaller one


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lanczos", Image.Resampling.LANCZOS),
        ("nearest", Image.Resampling.NEAREST),
        ("bilinear", Image.Resampling.BILINEAR),
        ("linear", Image.Resampling.BILINEAR),
        ("bicubic", Image.Resampling.BICUBIC),
        ("cubic", Image.Resampling.BICUBIC),
        ("box", Image.Resampling.BOX),
    ],
)
def test_named_filters(name: str, expected: Image.Resampling) -> None:
    assert choose_filter(name, (10, 10), (5, 5)) == expected
    assert choose_filter(name, (10, 10), (20, 20)) == expected


@pytest.mark.parametrize("name", ["hamming", "lancsoz", "lanczos4", "AREA"])
def test_unknown_interpolation_is_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="resize_interpolation"):
        choose_filter(name, (10, 10), (5, 5))


def test_unknown_interpolation_suggests_a_name() -> None:
    with pytest.raises(ValueError, match="did you mean 'lanczos'"):
        choose_filter("lancsoz", (10, 10), (5, 5))


# --------------------------------------------------------------------------------------------------
# resize_crop


def test_centre_crop_without_resize_is_plain_slicing() -> None:
    img = coordinate_image(300, 200)
    out, (top, left) = resize_crop(
        img,
        resized_wh=(300, 200),
        bucket_wh=(256, 128),
        random_crop=False,
        rng=np.random.default_rng(0),
    )
    # sd-scripts: p = (resized - bucket) // 2 per side.
    assert (top, left) == ((200 - 128) // 2, (300 - 256) // 2) == (36, 22)
    assert np.array_equal(out, img[36 : 36 + 128, 22 : 22 + 256])
    assert out.flags.c_contiguous and out.flags.writeable


def test_odd_excess_rounds_down() -> None:
    img = coordinate_image(71, 64)
    _, (top, left) = resize_crop(
        img,
        resized_wh=(71, 64),
        bucket_wh=(64, 64),
        random_crop=False,
        rng=np.random.default_rng(0),
    )
    assert (top, left) == (0, 3)


def test_random_crop_is_deterministic_and_in_range() -> None:
    img = coordinate_image(300, 200)

    def crop(seed: int) -> tuple[np.ndarray, tuple[int, int]]:
        return resize_crop(
            img,
            resized_wh=(300, 200),
            bucket_wh=(256, 128),
            random_crop=True,
            rng=np.random.default_rng(seed),
        )

    offsets = set()
    for seed in range(40):
        out, (top, left) = crop(seed)
        again, offset_again = crop(seed)
        assert np.array_equal(out, again) and offset_again == (top, left)
        assert 0 <= top <= 72 and 0 <= left <= 44
        assert np.array_equal(out, img[top : top + 128, left : left + 256])
        offsets.add((top, left))
    assert len(offsets) > 30


def test_random_crop_draws_width_then_height() -> None:
    rng = np.random.default_rng(11)
    expected_left = int(np.random.default_rng(11).integers(0, 45))
    _, (_, left) = resize_crop(
        coordinate_image(300, 200),
        resized_wh=(300, 200),
        bucket_wh=(256, 128),
        random_crop=True,
        rng=rng,
    )
    assert left == expected_left


def test_no_draw_when_nothing_is_trimmed() -> None:
    rng = np.random.default_rng(3)
    resize_crop(
        coordinate_image(64, 64), resized_wh=(64, 64), bucket_wh=(64, 64), random_crop=True, rng=rng
    )
    assert rng.random() == np.random.default_rng(3).random()


def test_flip_mirrors_the_crop() -> None:
    img = photo_like(200, 150)
    kwargs = {"resized_wh": (120, 90), "bucket_wh": (96, 64), "random_crop": False}
    plain, offset = resize_crop(img, rng=np.random.default_rng(0), **kwargs)
    flipped, flipped_offset = resize_crop(img, rng=np.random.default_rng(0), flip=True, **kwargs)
    assert offset == flipped_offset
    assert np.array_equal(flipped, plain[:, ::-1])
    assert flipped.flags.c_contiguous and flipped.flags.writeable


@pytest.mark.parametrize("interpolation", [None, "area", "lanczos", "bicubic", "nearest", "box"])
def test_resize_then_slice(interpolation: str | None) -> None:
    img = photo_like(333, 250, seed=2)
    resized, bucket = (190, 143), (128, 128)
    out, (top, left) = resize_crop(
        img, resized_wh=resized, bucket_wh=bucket, random_crop=True, rng=np.random.default_rng(4),
        interpolation=interpolation,
    )  # fmt: skip
    resample = choose_filter(interpolation, (333, 250), resized)
    full = np.asarray(Image.fromarray(img).resize(resized, resample))
    expected = full[top : top + 128, left : left + 128]
    assert np.array_equal(out, expected)


def test_upscale_uses_lanczos_by_default() -> None:
    img = photo_like(100, 80)
    out, _ = resize_crop(
        img,
        resized_wh=(200, 160),
        bucket_wh=(200, 160),
        random_crop=False,
        rng=np.random.default_rng(0),
    )
    expected = np.asarray(Image.fromarray(img).resize((200, 160), Image.Resampling.LANCZOS))
    assert np.array_equal(out, expected)


def test_rgba_alpha_is_resized_with_straight_colour() -> None:
    rgba = np.zeros((100, 120, 4), np.uint8)
    rgba[..., :3] = (30, 60, 90)
    rgba[:50, :, 3] = 255  # top half opaque, bottom half transparent (colour still 30, 60, 90)
    out, _ = resize_crop(
        rgba,
        resized_wh=(60, 50),
        bucket_wh=(60, 50),
        random_crop=False,
        rng=np.random.default_rng(0),
    )
    assert out.shape == (50, 60, 4)
    assert (out[..., :3] == (30, 60, 90)).all()  # premultiplied resizing would darken to 0
    assert (out[:24, :, 3] == 255).all() and (out[26:, :, 3] == 0).all()


def test_pillow_image_input_gives_the_same_result(tmp_path: Path) -> None:
    path = save(tmp_path, "x.png", Image.fromarray(photo_like(210, 170)))
    kwargs = {"resized_wh": (105, 85), "bucket_wh": (96, 64), "random_crop": True, "flip": True}
    from_array = resize_crop(decode_image(path), rng=np.random.default_rng(9), **kwargs)
    from_pillow = resize_crop(open_image(path), rng=np.random.default_rng(9), **kwargs)
    assert np.array_equal(from_array[0], from_pillow[0]) and from_array[1] == from_pillow[1]


def test_bucket_larger_than_resized_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        resize_crop(
            coordinate_image(64, 64), resized_wh=(64, 64), bucket_wh=(128, 64), random_crop=False,
            rng=np.random.default_rng(0),
        )  # fmt: skip


@settings(derandomize=True, deadline=None, max_examples=60)
@given(
    src=st.tuples(st.integers(8, 90), st.integers(8, 90)),
    resized=st.tuples(st.integers(8, 90), st.integers(8, 90)),
    trim=st.tuples(st.integers(0, 7), st.integers(0, 7)),
    random_crop=st.booleans(),
    flip=st.booleans(),
    channels=st.sampled_from([3, 4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_resize_crop_shape_and_offsets(
    src: tuple[int, int],
    resized: tuple[int, int],
    trim: tuple[int, int],
    random_crop: bool,
    flip: bool,
    channels: int,
    seed: int,
) -> None:
    img = np.random.default_rng(seed).integers(0, 256, (src[1], src[0], channels), dtype=np.uint8)
    bucket = (resized[0] - trim[0], resized[1] - trim[1])
    out, (top, left) = resize_crop(
        img, resized_wh=resized, bucket_wh=bucket, random_crop=random_crop, rng=np.random.default_rng(seed),
        flip=flip,
    )  # fmt: skip
    assert out.shape == (bucket[1], bucket[0], channels) and out.dtype == np.uint8
    assert 0 <= top <= trim[1] and 0 <= left <= trim[0]
    if not random_crop:
        assert (top, left) == (trim[1] // 2, trim[0] // 2)


# --------------------------------------------------------------------------------------------------
# SDXL crop conditioning as sd-scripts computes it


def test_conditioning_crop_top_left_follows_sd_scripts() -> None:
    # 1000x1500 into 832x1216: the letterboxed fit is 810.67x1216, so left = (832 - 810.67) // 2 = 10.
    assert conditioning_crop_top_left((1000, 1500), (832, 1216)) == (0, 10)
    # Flipped: left = 832 - (10 + 810.67) = 11.33, truncated.
    assert conditioning_crop_top_left((1000, 1500), (832, 1216), flipped=True) == (0, 11)
    # Wider image than bucket: fitted 1024x576, letterboxed top and bottom: (1024 - 576) // 2 = 224.
    assert conditioning_crop_top_left((1600, 900), (1024, 1024)) == (224, 0)
    assert conditioning_crop_top_left((1024, 1024), (1024, 1024), flipped=True) == (0, 0)


# --------------------------------------------------------------------------------------------------
# Face crop


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("girl_512_300_120_140", (512, 300, 120, 140)),
        ("a_b_c_1_2_3_4", (1, 2, 3, 4)),
        ("1_2_3_4", None),  # sd-scripts needs at least five parts
        ("img_0_10_10_10", None),  # centre x 0 means no face info there
        ("img_x_1_2_3", None),
        ("plain", None),
    ],
)
def test_parse_face_info(stem: str, expected: tuple[int, int, int, int] | None) -> None:
    assert parse_face_info(stem) == expected


def _marker_image(width: int, height: int, centre: tuple[int, int], half: int) -> np.ndarray:
    img = np.full((height, width, 3), 40, np.uint8)
    cx, cy = centre
    img[cy - half : cy + half, cx - half : cx + half] = 250
    return img


def _marker_centre(img: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(img[..., 0] > 145)
    return float(xs.mean()), float(ys.mean())


def test_face_crop_fixed_range_centres_the_face() -> None:
    # Face longer side 320, range (2, 2): scale = 512 / (320 * 2) = 0.8, above the 0.64 that covers.
    img = _marker_image(1000, 800, centre=(500, 400), half=40)
    out = face_crop(
        img, face_center_wh=(500, 400), face_size_wh=(320, 300), face_crop_aug_range=(2.0, 2.0),
        resolution_wh=(512, 512), rng=np.random.default_rng(0),
    )  # fmt: skip
    assert out.shape == (512, 512, 3)
    cx, cy = _marker_centre(out)
    assert abs(cx - 256) <= 1.5 and abs(cy - 256) <= 1.5
    # 80 px marker scaled by 0.8 -> 64 px.
    assert abs(int((out[..., 0] > 145).sum()) - 64 * 64) < 2 * 64


def test_face_crop_is_clamped_at_the_edges() -> None:
    img = _marker_image(600, 600, centre=(40, 40), half=20)
    out = face_crop(
        img, face_center_wh=(40, 40), face_size_wh=(40, 40), face_crop_aug_range=(10.0, 10.0),
        resolution_wh=(512, 512), rng=np.random.default_rng(0),
    )  # fmt: skip
    # Scale 1 (never enlarges); the window cannot start before 0, so the face stays near the corner.
    cx, cy = _marker_centre(out)
    assert abs(cx - 40) <= 1 and abs(cy - 40) <= 1


def test_face_crop_random_is_deterministic_and_in_bounds() -> None:
    img = photo_like(900, 700)
    kwargs = {
        "face_center_wh": (450, 300),
        "face_size_wh": (200, 220),
        "face_crop_aug_range": (1.5, 3.0),
        "resolution_wh": (384, 512),
    }
    for random_crop in (False, True):
        outs = [
            face_crop(img, rng=np.random.default_rng(s), random_crop=random_crop, **kwargs)
            for s in range(6)
        ]
        again = face_crop(img, rng=np.random.default_rng(0), random_crop=random_crop, **kwargs)
        assert all(o.shape == (512, 384, 3) for o in outs)
        assert np.array_equal(outs[0], again)
        assert len({o.tobytes() for o in outs}) > 1


def test_face_crop_same_size_returns_input() -> None:
    img = photo_like(64, 64)
    out = face_crop(
        img, face_center_wh=(32, 32), face_size_wh=(10, 10), face_crop_aug_range=(1.0, 2.0),
        resolution_wh=(64, 64), rng=np.random.default_rng(0),
    )  # fmt: skip
    assert out is img


def test_face_crop_smaller_than_resolution_is_an_image_problem() -> None:
    with pytest.raises(ImageProblem, match="never enlarges"):
        face_crop(
            photo_like(300, 200), face_center_wh=(150, 100), face_size_wh=(50, 50),
            face_crop_aug_range=(1.0, 2.0), resolution_wh=(512, 512), rng=np.random.default_rng(0),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Colour augmentation

# 32 colours in one row (a whole OpenCV vector block), given by a formula; the expected rows are what
# sd-scripts' own code (cv2 4.8.1: COLOR_BGR2HSV, hue + shift mod 180, COLOR_HSV2BGR) returned for them.
_HUE_ROW = ((np.arange(96, dtype=np.int64) * 37 + 11) % 256).astype(np.uint8).reshape(1, 32, 3)
_CV2_SHIFT_3_7 = [
    10, 55, 85, 122, 166, 196, 233, 13, 72, 88, 132, 162, 221, 236, 16, 54, 98, 128, 164, 209, 239,
    19, 64, 94, 131, 175, 205, 242, 22, 81, 97, 141, 171, 230, 245, 25, 62, 107, 137, 174, 218, 248,
    29, 73, 103, 140, 184, 214, 251, 32, 90, 105, 150, 180, 239, 254, 34, 72, 116, 146, 205, 220, 0,
    38, 82, 112, 148, 193, 223, 3, 48, 78, 114, 159, 189, 226, 7, 65, 80, 125, 155, 214, 229, 9, 46,
    91, 121, 158, 202, 232, 12, 57, 87, 124, 168, 198,
]  # fmt: skip
_CV2_SHIFT_MINUS_5_2 = [
    10, 33, 85, 122, 144, 196, 233, 21, 13, 88, 110, 162, 155, 236, 16, 54, 76, 128, 164, 187, 239,
    19, 42, 94, 131, 153, 205, 242, 30, 22, 97, 119, 171, 164, 245, 25, 62, 85, 137, 174, 196, 248,
    29, 51, 103, 140, 162, 214, 251, 39, 32, 105, 128, 180, 173, 254, 34, 72, 94, 146, 139, 220, 0,
    38, 60, 112, 148, 170, 223, 3, 26, 78, 114, 137, 189, 226, 14, 7, 80, 103, 155, 148, 229, 9, 46,
    69, 121, 158, 180, 232, 12, 35, 87, 124, 146, 198,
]  # fmt: skip


@pytest.mark.parametrize(
    ("shift", "expected"), [(3.7, _CV2_SHIFT_3_7), (-5.2, _CV2_SHIFT_MINUS_5_2)]
)
def test_hue_shift_matches_opencv(shift: float, expected: list[int]) -> None:
    assert images._shift_hue(_HUE_ROW, shift).reshape(-1).tolist() == expected


def test_color_aug_is_deterministic_and_applies_a_third_of_the_time() -> None:
    img = photo_like(64, 48)
    changed = 0
    for seed in range(600):
        out = color_aug(img, np.random.default_rng(seed))
        assert np.array_equal(out, color_aug(img, np.random.default_rng(seed)))
        assert out.shape == img.shape and out.dtype == np.uint8
        changed += out is not img
    assert 0.27 < changed / 600 < 0.39


def test_color_aug_gamma_is_on_raw_values() -> None:
    img = np.array([[[255, 128, 0]]], np.uint8)
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        out = color_aug(img, rng)
        if out is not img:
            seen.add(tuple(out[0, 0].tolist()))
    # Gamma maps 255 to 255 ** g: far below 255 for g < 1, unlike a normalised gamma.
    assert any(value[0] < 210 for value in seen)


def test_color_aug_keeps_alpha() -> None:
    img = np.dstack([photo_like(40, 30), np.arange(1200, dtype=np.uint8).reshape(30, 40)])
    for seed in range(60):
        out = color_aug(img, np.random.default_rng(seed))
        assert np.array_equal(out[..., 3], img[..., 3])


# --------------------------------------------------------------------------------------------------
# Tensors and masks


def test_to_tensor_range_and_layout() -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = (0, 128, 255)
    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[0, 0, 0] == -1.0 and t[2, 0, 0] == 1.0
    assert abs(float(t[1, 0, 0]) - (128 / 127.5 - 1)) < 1e-6
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0


def test_to_tensor_drops_alpha_and_accepts_read_only_arrays() -> None:
    img = np.full((4, 5, 4), 255, np.uint8)
    img.setflags(write=False)
    t = to_tensor(img)
    assert t.shape == (3, 4, 5) and bool((t == 1.0).all())


def test_alpha_to_mask() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = [[0, 51], [255, 102]]
    mask = alpha_to_mask(rgba)
    assert mask.dtype == np.float32 and mask.shape == (2, 2)
    assert np.allclose(mask, [[0.0, 0.2], [1.0, 0.4]])
    assert (alpha_to_mask(np.zeros((3, 4, 3), np.uint8)) == 1.0).all()


def test_image_problem_carries_reason_and_path() -> None:
    problem = ImageProblem("zero-byte file", "/data/a.png")
    assert problem.reason == "zero-byte file" and problem.path == "/data/a.png"
    assert str(problem) == "/data/a.png: zero-byte file"
    assert str(ImageProblem("zero-byte file")) == "zero-byte file"
