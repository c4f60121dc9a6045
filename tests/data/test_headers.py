"""The pure header reader (stoker.data.headers) against Pillow's own answer, file by file.

The oracle is Pillow as stoker uses it: ``Image.open`` with the formats the extension promises,
``im.size``, and stoker's EXIF orientation rule. Whenever `header_size` answers, Pillow must open
the same bytes without an error or a warning and say the same; on ordinary files it must answer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from stoker.data import catalog, headers, images
from stoker.data.dataset import load_dataset
from stoker.data.headers import MORE, header_size

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
_XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="{o}"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def pillow_answer(data: bytes, extension: str) -> tuple[int, int, int] | None:
    """(width, height, orientation) as stoker's Pillow path reads them; None if Pillow fails or warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the caller checks bombs
        try:
            with Image.open(io.BytesIO(data), formats=[_FORMATS[extension]]) as im:
                return im.size[0], im.size[1], images._orientation(im)
        except Exception:  # noqa: BLE001 - any failure or warning: the reader must not answer
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def agrees(data: bytes, extension: str) -> tuple[int, int, int] | None:
    """The reader's answer on the whole file, after checking it against Pillow's."""
    got = header_size(data, extension, len(data))
    assert got is not MORE  # the whole file was given
    if got is not None:
        assert got == pillow_answer(data, extension), (extension, got)
    return got


def _pixels(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _exif(orientation: int | None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
        exif[0x010F] = "stoker test camera"  # a string value stored out of line
    return exif


def jpeg(width: int, height: int, orientation: int | None = None, **save: object) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    mode = str(save.pop("mode", "RGB"))
    im = Image.fromarray(_pixels(rng, width, height)).convert(mode)
    out = io.BytesIO()
    im.save(out, "JPEG", exif=_exif(orientation), **save)
    return out.getvalue()


def png(width: int, height: int, mode: str = "RGB", **save: object) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    elif mode == "RGBA":
        im = Image.fromarray(_pixels(rng, width, height, 4), "RGBA")
    else:
        im = Image.fromarray(_pixels(rng, width, height)).convert(mode)
    out = io.BytesIO()
    im.save(out, "PNG", **save)
    return out.getvalue()


def webp(width: int, height: int, orientation: int | None = None, **save: object) -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    channels = 4 if save.pop("alpha", False) else 3
    im = Image.fromarray(_pixels(rng, width, height, channels))
    out = io.BytesIO()
    if orientation is not None:
        save["exif"] = _exif(orientation)
    im.save(out, "WEBP", **save)
    return out.getvalue()


# --- ordinary files: the reader answers, and answers as Pillow does ---------------------------


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"progressive": True},
        {"mode": "L"},
        {"mode": "CMYK"},
        {"quality": 95, "subsampling": 0},
        {"icc_profile": b"\0" * 3000},
        {"comment": b"a comment"},
        {"dpi": (300, 300)},
    ],
    ids=repr,
)
def test_jpeg_sizes_and_orientations_match_pillow(orientation, variant):
    data = jpeg(96, 40, orientation, **variant)
    got = agrees(data, ".jpg")
    assert got == (96, 40, orientation or 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_xmp_orientation_is_read_when_exif_has_none(orientation):
    xmp = _XMP.replace(b"{o}", str(orientation).encode())
    out = io.BytesIO()
    Image.new("RGB", (30, 20)).save(out, "JPEG", xmp=xmp)
    assert agrees(out.getvalue(), ".jpg") == (30, 20, orientation)


def test_a_large_exif_block_needs_more_than_the_first_read():
    exif = _exif(6)
    exif[0x010E] = "x" * 60000  # ImageDescription
    out = io.BytesIO()  # with a 60 kB ICC profile, the SOF frame lies past 64 KiB
    Image.new("RGB", (50, 70)).save(out, "JPEG", exif=exif, icc_profile=b"\0" * 60000)
    data = out.getvalue()
    assert header_size(data[: headers.HEAD_BYTES], ".jpg", len(data)) is MORE
    assert agrees(data, ".jpg") == (50, 70, 6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "I;16", "LA"])
def test_png_sizes_match_pillow(mode):
    assert agrees(png(33, 17, mode), ".png") == (33, 17, 1)


def test_png_text_chunks_and_gamma_are_passed_over():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt, steps 20")
    out = io.BytesIO()
    Image.new("RGB", (12, 9)).save(out, "PNG", pnginfo=info, dpi=(72, 72))
    assert agrees(out.getvalue(), ".png") == (12, 9, 1)


def test_png_with_exif_is_left_to_pillow():
    # eXIf carries an orientation: Pillow reads it.
    data = png(20, 10, exif=_exif(6))
    assert header_size(data, ".png", len(data)) is None
    assert pillow_answer(data, ".png") == (20, 10, 6)


@pytest.mark.parametrize(
    ("mode", "transparency"), [("P", 0), ("L", 7), ("RGB", (1, 2, 3)), ("I;16", 300), ("1", 0)]
)
def test_png_transparency_matches_pillow(mode, transparency):
    assert agrees(png(20, 10, mode, transparency=transparency), ".png") == (20, 10, 1)


@pytest.mark.parametrize(
    ("colour", "length", "answers"),
    [(0, 1, False), (0, 2, True), (2, 5, False), (2, 6, True), (6, 0, True)],
)
def test_png_short_transparency_chunk_as_pillow_reads_it(colour, length, answers):
    # Pillow's tRNS handler reads a 16-bit grey value or three for RGB; shorter is an error.
    ihdr = (20).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tRNS", b"\0" * length)
    data += _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")
    got = agrees(data, ".png")
    assert (got is not None) == answers
    assert (pillow_answer(data, ".png") is not None) == answers


def _chunk(cid: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(cid))
    return len(body).to_bytes(4, "big") + cid + body + crc.to_bytes(4, "big")


@pytest.mark.parametrize("orientation", [None, 1, 3, 6, 8])
@pytest.mark.parametrize(
    "variant", [{}, {"lossless": True}, {"alpha": True}, {"alpha": True, "lossless": True}]
)
def test_webp_sizes_and_orientations_match_pillow(orientation, variant):
    data = webp(45, 31, orientation, **variant)
    assert agrees(data, ".webp") == (45, 31, orientation or 1)


def test_animated_webp_is_left_to_pillow():
    frames = [Image.new("RGB", (16, 8), colour) for colour in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:])
    data = out.getvalue()
    assert pillow_answer(data, ".webp") == (16, 8, 1)
    assert header_size(data, ".webp", len(data)) is None


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    orientation=st.sampled_from([None, 1, 2, 3, 4, 5, 6, 7, 8]),
    kind=st.sampled_from(["jpeg", "webp", "webp-lossless", "png"]),
)
def test_any_size_and_orientation_matches_pillow(width, height, orientation, kind):
    if kind == "jpeg":
        data, ext = jpeg(width, height, orientation), ".jpg"
    elif kind == "png":
        data, ext, orientation = png(width, height), ".png", None
    else:
        data, ext = webp(width, height, orientation, lossless=kind == "webp-lossless"), ".webp"
    assert agrees(data, ext) == (width, height, orientation or 1)


# --- cut-off, mutated and foreign data: None, or Pillow's exact answer -------------------------


_SAMPLES = {
    ".jpg": jpeg(40, 24, 6, icc_profile=b"\1" * 200, comment=b"hi"),
    ".png": png(24, 40, "RGB", dpi=(96, 96)),
    ".webp": webp(40, 24, 8, alpha=True),
}


@pytest.mark.parametrize("extension", sorted(_SAMPLES))
def test_every_cut_of_a_file_is_refused_or_agrees(extension):
    data = _SAMPLES[extension]
    answers = set()
    for cut in range(len(data)):
        answer = header_size(data[:cut], extension, cut)
        assert answer is not MORE
        if answer is not None:
            assert answer == pillow_answer(data[:cut], extension)
        answers.add(answer)
        # the same prefix of the longer file: MORE or None until the header is in
        longer = header_size(data[:cut], extension, len(data))
        assert longer in (MORE, None) or longer == agrees(data, extension)
    if extension == ".webp":
        assert answers == {None}  # libwebp wants the whole RIFF container
    else:
        assert None in answers and len(answers) == 2  # once the header is in, the size is known


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    extension=st.sampled_from(sorted(_SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 2000),
)
def test_mutated_headers_are_refused_or_agree_with_pillow(extension, edits, cut):
    data = bytearray(_SAMPLES[extension])
    for where, value in edits:
        if where < len(data):
            data[where] = value
    mutated = bytes(data[:cut] if cut is not None else data)
    agrees(mutated, extension)


@pytest.mark.parametrize(
    ("data", "extension"),
    [
        (b"", ".jpg"),
        (b"\xff\xd8\xff", ".jpg"),
        (b"not an image at all", ".jpg"),
        (b"\x89PNG\r\n\x1a\n", ".png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\0" * 20, ".webp"),
        (png(8, 8), ".jpg"),  # PNG data under a JPEG name: Pillow says what it really is
        (jpeg(8, 8), ".png"),
        (jpeg(8, 8), ".bmp"),  # a format the reader does not parse
    ],
)
def test_garbage_and_other_formats_return_none(data, extension):
    assert header_size(data, extension, len(data)) is None


def test_png_chunk_handlers_are_the_ones_pillow_has():
    # The reader passes over chunks Pillow has no handler for; a new Pillow handler must be seen.
    pillow = {n[6:].encode() for n in dir(PngImagePlugin.PngStream) if n.startswith("chunk_")}
    assert pillow == set(headers.PNG_HANDLED)


# --- read_image_size and the scan: the same answers and reasons with and without the reader ----


def _write_corpus(folder: Path) -> dict[str, str]:
    folder.mkdir()
    files = {
        "a.jpg": jpeg(640, 384, 6),
        "b.jpeg": jpeg(384, 640, progressive=True),
        "c.png": png(512, 512, "RGBA"),
        "d.png": png(600, 400, exif=_exif(8)),
        "e.webp": webp(700, 300, 5),
        "f.webp": webp(300, 300, lossless=True),
        "g.jpg": jpeg(500, 500)[:300],  # cut inside the header
        "h.jpg": png(512, 512),  # PNG data named .jpg
        "i.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        "j.jpg": b"",
        "k.JPG": jpeg(512, 768, 3),
    }
    captions = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        captions[Path(name).stem] = {"caption": f"photo {name}"}
    return captions


def _dataset_summary(monkeypatch: pytest.MonkeyPatch, config: Path, fast: bool) -> tuple:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(images, "_FAST_EXTENSIONS", frozenset())
        ds = load_dataset(config, on_error="skip")
    catalog, report = ds.catalog, ds.report
    return (
        [catalog.paths[i] for i in range(len(catalog))],
        catalog.widths.tolist(),
        catalog.heights.tolist(),
        sorted((p.path, p.kind, p.reason) for p in report.problems),
        [dataclasses.asdict(b) for b in report.buckets],
        ds.fingerprint(),
    )


@pytest.mark.parametrize("source", ["folder", "metadata"])
def test_the_scan_gives_the_same_dataset_with_and_without_the_reader(tmp_path, monkeypatch, source):
    captions = _write_corpus(tmp_path / "img")
    config = tmp_path / "d.toml"
    if source == "metadata":
        (tmp_path / "meta.json").write_text(json.dumps(captions))
        where = "metadata_file = 'meta.json'\nimage_dir = 'img'"
    else:
        where = "image_dir = 'img'\nclass_tokens = 'sks'"
    config.write_text(
        "[general]\nenable_bucket = true\n[[datasets]]\nresolution = 512\nbatch_size = 1\n"
        f"[[datasets.subsets]]\n{where}\n"
    )
    fast = _dataset_summary(monkeypatch, config, fast=True)
    slow = _dataset_summary(monkeypatch, config, fast=False)
    assert fast == slow
    sizes = {Path(p).name: (w, h) for p, w, h in zip(*fast[:3], strict=True)}
    assert sizes["a.jpg"] == (384, 640) and sizes["e.webp"] == (300, 700)
    assert sizes["d.png"] == (400, 600) and sizes["k.JPG"] == (512, 768)


def test_read_image_size_uses_the_reader_and_keeps_pillow_for_bombs(tmp_path, monkeypatch):
    path = tmp_path / "r.jpg"
    path.write_bytes(jpeg(64, 32, 6))
    calls = []
    monkeypatch.setattr(images, "_open_pillow", lambda fp, p: calls.append(p))
    assert images.read_image_size(path) == (32, 64)
    assert images.read_image_size(path, exif=False) == (64, 32)
    assert calls == []  # answered from the header bytes alone
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2048 pixels: over twice the limit
    with pytest.raises(images.ImageProblem, match="decompression bomb"):
        images.read_image_size(path)


@pytest.mark.parametrize("threads", [1, 3])
def test_sizes_and_problems_land_on_their_rows_across_chunks(tmp_path, threads):
    shapes = [jpeg(20, 10), jpeg(10, 30, 6), png(7, 9), b"broken", webp(12, 5)]
    paths = []
    for i in range(2 * catalog._CHUNK + 37):
        kind = i % len(shapes) if i % 97 else 3  # every 97th file broken, in several chunks
        path = tmp_path / f"{i:05d}{('.jpg', '.jpg', '.png', '.jpg', '.webp')[kind]}"
        path.write_bytes(shapes[kind])
        paths.append(str(path))
    seen: list[tuple[int, int]] = []
    sizes, failed = catalog._parallel_sizes(
        paths, threads, lambda done, total: seen.append((done, total))
    )
    expected_failed = []
    for i, path in enumerate(paths):
        try:
            assert tuple(sizes[i]) == images.read_image_size(path)
        except images.ImageProblem as err:
            assert tuple(sizes[i]) == (0, 0)
            expected_failed.append((i, err.reason))
    assert failed == expected_failed and len(failed) > 3
    assert seen[-1] == (len(paths), len(paths)) and len(seen) == 3


def _segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + (len(body) + 2).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("marker", "body", "answers"),
    [
        (0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x02ab", True),
        (0xED, b"Photoshop 3.0\x008BIM\x03\xed\x00\x00\x00\x00\x10" + b"\1" * 16, True),
        (0xED, b"Photoshop 3.0\x008BIM\x04\x04", False),  # Pillow indexes the missing name length
        (0xED, b"Photoshop 3.0\x008BIM\x04", True),  # a short code: Pillow stops quietly
        (0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01", True),
        (0xEE, b"Adobe\x00", False),  # Pillow reads a 16-bit version past the end
        (0xE0, b"JFIF\x00", False),
        (0xE2, b"ICC_PROFILE\x00\x01", False),  # Pillow indexes byte 13 of the fragment
        (0xE2, b"MPF\x00II*\x00", False),  # a camera MPO: Pillow's MPO plugin decides
        (0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + _XMP.replace(b"{o}", b"7"), True),
    ],
)
def test_app_segments_pillow_indexes_into(marker, body, answers):
    base = jpeg(30, 20)
    data = base[:2] + _segment(marker, body) + base[2:]
    got = agrees(data, ".jpg")
    assert (got is not None) == answers
    if answers:
        assert pillow_answer(data, ".jpg") is not None


@pytest.mark.parametrize(
    ("body", "answers"),
    [
        (b"icc\0\0" + zlib.compress(b"\1" * 3000), True),
        (b"icc\0\0" + b"not zlib data", True),  # Pillow drops a corrupt profile and goes on
        (b"icc\0\1" + zlib.compress(b"\1" * 30), False),  # unknown compression method
        (b"icc\0", False),  # no method byte: Pillow indexes past the end
        (b"icc", False),
    ],
)
def test_png_icc_profile_chunk_as_pillow_reads_it(body, answers):
    ihdr = (20).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"iCCP", body)
    data += _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")
    got = agrees(data, ".png")
    assert (got is not None) == answers
    assert (pillow_answer(data, ".png") is not None) == answers


def test_png_icc_profile_over_pillows_text_limit_is_left_to_pillow(tmp_path, monkeypatch):
    data = png(20, 10, icc_profile=b"\1" * 5000)
    assert agrees(data, ".png") == (20, 10, 1)
    assert header_size(data, ".png", len(data), png_text_limit=4000) is None
    (tmp_path / "icc.png").write_bytes(data)
    assert images.read_image_size(tmp_path / "icc.png") == (20, 10)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_CHUNK", 4000)
    assert pillow_answer(data, ".png") is None  # Pillow: decompressed data too large
    with pytest.raises(images.ImageProblem, match="too large"):
        images.read_image_size(tmp_path / "icc.png")  # the limit reaches the reader too
