"""Pixels for one sample: read sizes, decode, resize, crop, flip, colour aug, tensors, as sd-scripts does.

Every function here is a pure transform of one image or one file; randomness comes only from the
``np.random.Generator`` passed in (see ``stoker.rng``), never from global state.

Where sd-scripts (``library/train_util.py`` and ``library/utils.py``) fixes the arithmetic (resize sizes,
centre and random crop offsets, face crop scale, colour augmentation, the SDXL crop conditioning value),
this module reproduces it. Where sd-scripts relies on OpenCV, this module uses Pillow and numpy and says
how close the result is. Deliberate differences, each noted where it happens:

- EXIF orientation is applied by default (``exif=True``); sd-scripts ignores it (sd-scripts issue #1316),
  so phone photos train sideways there. Pass ``exif=False`` for byte-for-byte sd-scripts behaviour.
- 16-bit greyscale PNGs are scaled to 8 bits; Pillow's ``convert("RGB")``, which sd-scripts uses,
  clips them to 255 and yields an almost white image.
- Palette images with transparency go through RGBA, which gives the same RGB values as sd-scripts'
  ``convert("RGB")`` without Pillow's "Palette images with Transparency" warning.
- ``bilinear`` and ``bicubic`` use Pillow's filters, which antialias when shrinking; sd-scripts sends
  them to ``cv2.resize``, which does not. ``area`` is approximated as described on `choose_filter`.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import warnings
from typing import IO

import numpy as np
import torch
import torch.nn.functional
from PIL import Image, PngImagePlugin, UnidentifiedImageError, features

try:  # libjpeg-turbo with DCT-domain scaling; without it JPEGs go through Pillow's draft
    import simplejpeg as _turbo  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - exercised by monkeypatching _turbo to None in the tests
    _turbo = None

from stoker.data import headers
from stoker.data.inputs import UnusableFile, open_regular, os_reason

__all__ = [
    "INTERPOLATIONS",
    "ImageProblem",
    "alpha_to_mask",
    "choose_filter",
    "color_aug",
    "conditioning_crop_top_left",
    "decode_image",
    "decode_scaled",
    "face_crop",
    "fast_jpeg_decoder",
    "open_image",
    "parse_face_info",
    "read_image_size",
    "resize_crop",
    "to_tensor",
]

INTERPOLATIONS: tuple[str, ...] = (
    "area",
    "bicubic",
    "bilinear",
    "box",
    "cubic",
    "lanczos",
    "linear",
    "nearest",
)
"""The ``resize_interpolation`` names sd-scripts accepts (``validate_interpolation_fn``)."""

_NAMED_FILTERS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "linear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# EXIF orientation -> the transpose that shows the image upright (the table of ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# Leading bytes of formats we read; a file that starts with one but cannot be identified is cut short.
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")

# The Pillow formats each image extension promises. Pillow would otherwise try every format it has
# (EPS runs Ghostscript, PSD, DDS, ...) on a file of any name; a file is opened only as its name says.
_FORMATS_BY_EXTENSION: dict[str, tuple[str, ...]] = {
    ".png": ("PNG",),
    ".jpg": ("JPEG",),  # Pillow's JPEG opener also returns camera MPO files
    ".jpeg": ("JPEG",),
    ".webp": ("WEBP",),
    ".bmp": ("BMP",),
    ".avif": ("AVIF",),
    ".jxl": ("JXL",),
}
# Extensions whose headers stoker.data.headers reads without Pillow (WebP only when Pillow has it).
_FAST_EXTENSIONS = frozenset(
    (".jpg", ".jpeg", ".png", *((".webp",) if features.check_module("webp") else ()))
)
# Formats named in a "this is really X" reason when a file does not match its extension.
_SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageProblem(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few plain words.

    The dataset turns this into a skip, a warning or a ``DatasetError`` according to ``on_error``.

    Attributes:
        reason: Short plain text such as ``"zero-byte file"`` or ``"truncated image data"``.
        path: The file, when known.
        size_changed: The file is readable but not the size the caller expected.
    """

    def __init__(
        self,
        reason: str,
        path: str | os.PathLike[str] | None = None,
        *,
        size_changed: bool = False,
    ) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        self.size_changed = size_changed
        super().__init__(reason if self.path is None else f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------------
# Reading files


def read_image_size(path: str | os.PathLike[str], *, exif: bool = True) -> tuple[int, int]:
    """Return ``(width, height)`` of an image from its header, without decoding pixels.

    With ``exif=True`` the size is the upright size: EXIF orientations 5 to 8 swap width and height,
    exactly as `decode_image` will rotate the pixels. The orientation is taken from header metadata
    only (for PNG, an ``eXIf`` chunk after the pixel data is ignored, by both functions alike).

    The check is as cheap as the header: zero-byte files, files that are not images, unreadable files,
    decompression bombs (more than twice ``PIL.Image.MAX_IMAGE_PIXELS``, Pillow's own error limit;
    set it to ``None`` to allow any size) and files cut off inside the header raise. Between one and
    two times the limit Pillow itself warns (``DecompressionBombWarning``) and the size is returned.
    Pixel data cut short is found only when the file is decoded.

    JPEG, PNG and WebP headers are read from the file's first bytes by `stoker.data.headers`
    when it is sure of Pillow's answer (a few microseconds instead of Pillow's ~100); any other
    file, and any header it is unsure of, goes to Pillow, whose reasons and limits apply as
    described above.

    Raises:
        ImageProblem: The file cannot be used; ``reason`` says why.
    """
    fast = _header_size(path)
    if fast is not None:
        width, height, orientation = fast
        return (height, width) if exif and orientation >= 5 else (width, height)
    with _open_file(path) as fp:
        return _upright_size(_open_pillow(fp, path), path, exif=exif)


def _header_size(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """Size and orientation from `stoker.data.headers` when it is sure, else None (ask Pillow).

    Only the happy case is answered here: a regular, non-empty file whose header the reader
    parses. Everything else (an unreadable file, a FIFO, a size over
    ``PIL.Image.MAX_IMAGE_PIXELS``, a header the reader is unsure of) returns None, and Pillow's
    path gives the reason, the warning or the size exactly as before. The file is opened with
    ``O_NONBLOCK`` (a FIFO never blocks) and read with at most two ``pread`` calls.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FAST_EXTENSIONS:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        data = os.pread(fd, headers.HEAD_BYTES, 0)
        text_limit = PngImagePlugin.MAX_TEXT_CHUNK
        answer = headers.header_size(data, extension, info.st_size, png_text_limit=text_limit)
        if answer is headers.MORE and len(data) == headers.HEAD_BYTES:
            data = os.pread(fd, headers.MAX_HEAD_BYTES, 0)
            answer = headers.header_size(data, extension, info.st_size, png_text_limit=text_limit)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not isinstance(answer, tuple):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and answer[0] * answer[1] > limit:
        return None
    return answer


def _upright_size(im: Image.Image, path: str | os.PathLike[str], *, exif: bool) -> tuple[int, int]:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageProblem(f"empty image ({width}x{height} pixels)", path)
    if exif and _orientation(im) >= 5:
        return height, width
    return width, height


def open_image(
    path: str | os.PathLike[str],
    *,
    alpha: bool = False,
    draft_size: tuple[int, int] | None = None,
    exif: bool = True,
    expect_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode a file into a loaded Pillow image in mode ``"RGB"`` or, with ``alpha``, ``"RGBA"``.

    This is `decode_image` without the final conversion to numpy, for callers that resize next:
    `resize_crop` accepts the Pillow image and so saves two full-size conversions.

    Args:
        path: The image file.
        alpha: Return RGBA; images without alpha get 255. Without it, alpha is dropped the way
            sd-scripts' ``convert("RGB")`` drops it (no compositing onto a background).
        draft_size: The ``(width, height)`` the caller will resize to (upright, as from
            `read_image_size`). For JPEG files the decoder then works at a reduced DCT scale of 1/2,
            1/4 or 1/8, the largest that keeps both sides at least this size, so the later resize is
            still a downscale. Other formats ignore it. Measured on a 4000x3000 photo-like JPEG
            resized to 1155x866 by `resize_crop`: mean absolute difference from the full decode
            0.33/255 (99th percentile 1/255), 2.6/255 (p99 9/255) where heavy grain dominates;
            `decode_image` took 22 ms instead of 106 ms, and decode plus resize 45 ms instead of
            213 ms (86 ms when the full decode stays a Pillow image).
        exif: Apply the EXIF orientation (``ImageOps.exif_transpose`` semantics).
        expect_size: The upright ``(width, height)`` the caller planned for (the catalog's, from
            the scan or from metadata ``image_size``). A file of another size raises before its
            pixels are decoded, so a file changed after the scan is never squashed into the old
            bucket.

    Raises:
        ImageProblem: The file cannot be decoded, or its size is not ``expect_size``; ``reason``
            says why.
    """
    # No with-statement on the image: on Pillow 10 leaving one closes the image we return.
    with _open_file(path) as fp:
        im = _open_pillow(fp, path)
        if expect_size is not None:
            _check_size(_upright_size(im, path, exif=exif), expect_size, path)
        orientation = _orientation(im) if exif else 1
        return _decode_pillow(im, path, alpha=alpha, draft_size=draft_size, orientation=orientation)


def _decode_pillow(
    im: Image.Image,
    path: str | os.PathLike[str],
    *,
    alpha: bool,
    draft_size: tuple[int, int] | None,
    orientation: int,
) -> Image.Image:
    """Pillow's decode of an opened file: draft (JPEG), load, RGB or RGBA, upright."""
    if draft_size is not None and im.format == "JPEG":
        want = draft_size if orientation < 5 else (draft_size[1], draft_size[0])
        im.draft("RGB", (max(1, int(want[0])), max(1, int(want[1]))))
    _load(im, path)
    out = _to_rgb_or_rgba(im, alpha=alpha)
    if orientation in _ORIENTATION_TRANSPOSE:
        out = out.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return out


def fast_jpeg_decoder() -> str:
    """Name the JPEG decoder `decode_scaled` uses: ``"simplejpeg X.Y"`` or ``"pillow"`` (fallback)."""
    if _turbo is None:
        return "pillow"
    return f"simplejpeg {getattr(_turbo, '__version__', '?')}"


def decode_scaled(
    path: str | os.PathLike[str],
    *,
    size_wh: tuple[int, int],
    alpha: bool = False,
    exif: bool = True,
    expect_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode for a resize to ``size_wh``: a ``uint8`` ``(H, W, 3|4)`` array, JPEGs at a reduced scale.

    The fast per-image path (issue #11). A JPEG in colour (YCbCr or RGB) or greyscale is decoded by
    libjpeg-turbo through simplejpeg at the smallest DCT scale of 1/8, 1/4 or 1/2 that keeps both
    sides at least ``size_wh`` (upright, as from `read_image_size`); only these three scales have
    SIMD inverse DCTs, the 3/8 to 7/8 ones decode slower than full size. Everything else (PNG, WebP,
    CMYK JPEGs, 16-bit, palette) and every JPEG that simplejpeg rejects, or all JPEGs when simplejpeg
    is not installed, goes through `open_image` with ``draft_size``, so modes, alpha, EXIF
    orientation and the reasons for bad files are exactly those of `decode_image`. A greyscale JPEG
    is replicated to three channels, and with ``alpha`` a JPEG gets an opaque alpha channel, as
    Pillow's conversions do.

    The result may be read-only (a view of Pillow's buffer); `resize_crop` copies it.
    ``expect_size`` is checked as `open_image` checks it, before any pixel is decoded.

    Raises:
        ImageProblem: The file cannot be decoded; ``reason`` says why.
    """
    with _open_file(path) as fp:
        im = _open_pillow(fp, path)
        if expect_size is not None:
            _check_size(_upright_size(im, path, exif=exif), expect_size, path)
        orientation = _orientation(im) if exif else 1
        want = size_wh if orientation < 5 else (size_wh[1], size_wh[0])
        if _turbo is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
            fp.seek(0)
            pixels = _decode_turbo(fp.read(), im.size, want, alpha=alpha)
            if pixels is not None:
                if orientation in _ORIENTATION_TRANSPOSE:
                    upright = Image.fromarray(pixels).transpose(_ORIENTATION_TRANSPOSE[orientation])
                    return np.asarray(upright)
                return pixels
        pil = _decode_pillow(im, path, alpha=alpha, draft_size=size_wh, orientation=orientation)
    return np.asarray(pil)


def _dct_scale(size_wh: tuple[int, int], want_wh: tuple[int, int]) -> int:
    """The largest of 8, 4, 2 (else 1) that divides ``size_wh`` (rounding up) to at least ``want_wh``."""
    for factor in (8, 4, 2):
        if -(-size_wh[0] // factor) >= want_wh[0] and -(-size_wh[1] // factor) >= want_wh[1]:
            return factor
    return 1


def _decode_turbo(
    data: bytes, size_wh: tuple[int, int], want_wh: tuple[int, int], *, alpha: bool
) -> np.ndarray | None:
    """libjpeg-turbo at 1/`_dct_scale`; ``None`` when it refuses the data (Pillow then decides)."""
    factor = _dct_scale(size_wh, want_wh)
    # simplejpeg picks the smallest libjpeg scale whose output covers these minimums; asking for
    # exactly ceil(side / factor) makes that 1/factor (libjpeg rounds scaled sides up too).
    min_w, min_h = (-(-size_wh[0] // factor), -(-size_wh[1] // factor)) if factor > 1 else (0, 0)
    try:
        pixels: np.ndarray = _turbo.decode_jpeg(
            data, colorspace="RGBA" if alpha else "RGB", min_width=min_w, min_height=min_h
        )
    except (ValueError, RuntimeError, OSError):
        # strict libjpeg warnings (extraneous bytes, a cut-off scan) and real errors alike: Pillow
        # accepts or rejects the file exactly as the rest of stoker does, with its reasons.
        return None
    if pixels.shape[1] != min_w and factor > 1 or pixels.shape[2] != (4 if alpha else 3):
        return None  # not the scale asked for: an unexpected libjpeg; stay exact with Pillow
    return pixels


def decode_image(
    path: str | os.PathLike[str],
    *,
    alpha: bool = False,
    draft_size: tuple[int, int] | None = None,
    exif: bool = True,
) -> np.ndarray:
    """Decode a file into a writable ``uint8`` array of shape ``(H, W, 3)``, or ``(H, W, 4)`` with alpha.

    Modes are handled as follows: RGB as is; RGBA, LA and palette images with transparency drop alpha
    (or keep it with ``alpha=True``); L and 1 are replicated to three channels; CMYK and other colour
    spaces use Pillow's conversion; 16-bit greyscale (``I;16`` and ``I``) is scaled by 255/65535 and
    rounded. Arguments are as for `open_image`.

    Raises:
        ImageProblem: The file cannot be decoded; ``reason`` says why.
    """
    # np.array copies once out of Pillow; np.asarray would share a read-only bytes buffer instead.
    return np.array(open_image(path, alpha=alpha, draft_size=draft_size, exif=exif))


def _check_size(
    found: tuple[int, int], expected: tuple[int, int], path: str | os.PathLike[str]
) -> None:
    if tuple(found) != tuple(expected):
        raise ImageProblem(
            f"size changed: the file is {found[0]}x{found[1]}, but the scan or metadata said "
            f"{expected[0]}x{expected[1]} (rescan, or fix image_size in the metadata)",
            path,
            size_changed=True,
        )


def _open_file(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a regular file for reading, turning OS errors and empty files into `ImageProblem`."""
    try:
        fp = open_regular(path)
    except UnusableFile as exc:
        raise ImageProblem(f"unreadable: {exc.reason}", path) from None
    except OSError as exc:
        raise ImageProblem(f"unreadable: {os_reason(exc)}", path) from None
    if os.fstat(fp.fileno()).st_size == 0:
        fp.close()
        raise ImageProblem("zero-byte file", path)
    return fp


def _promised_formats(path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The formats the file's extension promises, or None (any) for an extension stoker does not scan."""
    return _FORMATS_BY_EXTENSION.get(os.path.splitext(os.fspath(path))[1].lower())


def _open_pillow(fp: IO[bytes], path: str | os.PathLike[str]) -> Image.Image:
    """Parse the header with ``Image.open`` as the formats the extension promises.

    Failures become `ImageProblem`; a file whose data is another format says which, so it can be
    renamed.
    """
    formats = _promised_formats(path)
    try:
        return Image.open(fp, formats=list(formats) if formats is not None else None)
    except UnidentifiedImageError:
        fp.seek(0)
        head = fp.read(16)
        if formats is not None:
            actual = _actual_format(fp)
            if actual is not None and actual not in formats:
                raise ImageProblem(
                    f"{actual} data in a file named {os.path.splitext(os.fspath(path))[1]}; "
                    f"stoker opens a file only as the format its name promises (rename it)",
                    path,
                ) from None
        if head.startswith(_MAGIC):
            raise ImageProblem("truncated or corrupt image header", path) from None
        raise ImageProblem("not an image (cannot identify format)", path) from None
    except Image.DecompressionBombError as exc:
        raise ImageProblem(_bomb_reason(str(exc)), path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageProblem(_decode_reason(exc, "header"), path) from None


def _actual_format(fp: IO[bytes]) -> str | None:
    """Which common raster format the data is, checked against that list only (nothing is run)."""
    fp.seek(0)
    try:
        with Image.open(fp, formats=list(_SAFE_FORMATS)) as probe:
            return probe.format
    except Exception:  # noqa: BLE001 - only naming the format for a message; unknown is fine
        return None


def _load(im: Image.Image, path: str | os.PathLike[str]) -> None:
    """Decode the pixels; Pillow raises a handful of exception types for bad data."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageProblem(_bomb_reason(str(exc)), path) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageProblem(_decode_reason(exc, "data"), path) from None


def _bomb_reason(message: str) -> str:
    """Turn Pillow's DecompressionBombError message into ``decompression bomb: N pixels ...``."""
    numbers = re.findall(r"\d+", message)
    if len(numbers) >= 2:
        return f"decompression bomb: {numbers[0]} pixels exceeds limit {numbers[1]}"
    return f"decompression bomb: {message}"


def _decode_reason(exc: BaseException, part: str) -> str:
    """Name a failure in the image ``part`` ("header" or "data") in plain words for any format."""
    message = str(exc)
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return f"truncated image {part}"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    return f"corrupt image {part}: {message or type(exc).__name__}"


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from header metadata only, so sizes and pixels always agree; 1 when absent."""
    try:
        if im.format == "PNG":
            # PngImageFile.getexif() decodes the whole image to look past IDAT; read_image_size must not.
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = exif.get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not reject good pixels; treat as upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_rgb_or_rgba(im: Image.Image, *, alpha: bool) -> Image.Image:
    """Convert any decoded mode to RGB or RGBA (see `decode_image` for the rules)."""
    target = "RGBA" if alpha else "RGB"
    if im.mode == target:
        return im
    if im.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(im).astype(np.uint32)
        # Rounded v * 255 / 65535 == (v + 128) // 257 for 0 <= v <= 65535.
        grey = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert(target)
    if im.mode == "P" and "transparency" in im.info:
        # Straight to RGB warns for byte transparency; via RGBA gives the same RGB without it.
        im = im.convert("RGBA")
        return im if alpha else im.convert("RGB")
    return im.convert(target)


# --------------------------------------------------------------------------------------------------
# Resizing and cropping


def choose_filter(
    interpolation: str | None, src_wh: tuple[int, int], dst_wh: tuple[int, int]
) -> Image.Resampling:
    """Return the Pillow filter for an sd-scripts ``resize_interpolation`` name and a resize.

    ``None`` follows sd-scripts' default rule (``library/utils.py`` ``resize_image``): ``area`` when
    neither side grows, otherwise ``lanczos``. Names map to the Pillow filter of the same name
    (``linear`` is ``bilinear``, ``cubic`` is ``bicubic``); sd-scripts itself uses Pillow for
    ``lanczos`` and ``box`` and OpenCV for the rest.

    ``area`` (OpenCV ``INTER_AREA``, exact pixel-area averaging) has no Pillow filter. Measured against
    ``cv2.INTER_AREA`` on a grainy 4000x3000 photo-like image, Pillow's ``BOX`` is exact at integer
    factors and within 1.8/255 mean absolute difference at factors from 3 up, but 4 to 10/255 off
    below 2, where its whole-pixel weights alias; antialiased ``BILINEAR`` is within 0.8 to 2.6/255
    below 2. So ``area`` is ``BOX`` when both sides shrink by 2 or more, else ``BILINEAR``.
    ``reducing_gap`` was measured too and left off: it is faster but 2 to 4/255 off at non-integer
    factors.

    Raises:
        ValueError: ``interpolation`` is not one of `INTERPOLATIONS`.
    """
    if interpolation is None:
        grows = dst_wh[0] > src_wh[0] or dst_wh[1] > src_wh[1]
        interpolation = "lanczos" if grows else "area"
    if interpolation == "area":
        factor = min(src_wh[0] / max(1, dst_wh[0]), src_wh[1] / max(1, dst_wh[1]))
        return Image.Resampling.BOX if factor >= 2.0 else Image.Resampling.BILINEAR
    try:
        return _NAMED_FILTERS[interpolation]
    except KeyError:
        close = difflib.get_close_matches(str(interpolation), INTERPOLATIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"resize_interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}{hint}"
        ) from None


def resize_crop(
    img: np.ndarray | Image.Image,
    *,
    resized_wh: tuple[int, int],
    bucket_wh: tuple[int, int],
    random_crop: bool,
    rng: np.random.Generator,
    interpolation: str | None = None,
    flip: bool = False,
    fast: bool = False,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to ``resized_wh``, crop to ``bucket_wh`` and optionally flip, as sd-scripts does.

    This is sd-scripts' ``trim_and_resize_if_required`` followed by its flip: the image is resized to
    ``resized_wh`` (skipped when already that size), then each side longer than the bucket is trimmed,
    width first, then height: centred at ``(resized - bucket) // 2``, or with ``random_crop`` at an
    offset drawn uniformly from ``0 .. resized - bucket`` inclusive, one ``rng`` draw per trimmed side.
    ``flip`` mirrors the result left to right. RGBA input keeps its alpha, resized with straight (not
    premultiplied) colour, as OpenCV resizes it.

    The resize is one Pillow pass; the crop and flip are numpy views, and one copy at the end makes
    the result a new, writable, C-contiguous array. (Resampling only the kept region with Pillow's
    ``box`` was tried: it saves the few trimmed pixels but moves exact ties of the ``box`` and
    ``nearest`` filters, up to 4/255 from a full resize, so it was left out.)

    Args:
        img: ``uint8`` array ``(H, W, 3 or 4)`` or a Pillow RGB/RGBA image (from `open_image`).
        resized_wh: Size after resizing, from the bucket assignment.
        bucket_wh: Final size; no side may exceed ``resized_wh``.
        random_crop: Draw the crop offset instead of centring it.
        rng: Source of the crop offsets.
        interpolation: An sd-scripts ``resize_interpolation`` name or ``None`` (see `choose_filter`).
        flip: Mirror horizontally after cropping.
        fast: Resize arrays with torch's antialiased ``interpolate`` where it stands in for the
            filter (see `torch_filter`): about 4 ms instead of Pillow's 18 ms for a 1 MP result,
            within 0.5/255 of Pillow's antialiased bilinear on photos. The result is then writable
            but may be a view of the resized buffer (not C-contiguous). Pillow images, and the
            filters torch does not have, take the Pillow path.

    Returns:
        The ``(bucket_h, bucket_w, C)`` array and the crop offset ``(top, left)`` in resized pixels.
        For SDXL's ``crop_top_left`` conditioning, which sd-scripts computes differently, see
        `conditioning_crop_top_left`.

    Raises:
        ValueError: A bucket side is larger than the resized side.
    """
    resized_w, resized_h = int(resized_wh[0]), int(resized_wh[1])
    bucket_w, bucket_h = int(bucket_wh[0]), int(bucket_wh[1])
    if bucket_w > resized_w or bucket_h > resized_h or min(bucket_w, bucket_h) <= 0:
        raise ValueError(
            f"bucket {bucket_w}x{bucket_h} does not fit in resized {resized_w}x{resized_h}"
        )
    left = _trim_offset(resized_w - bucket_w, random_crop, rng)
    top = _trim_offset(resized_h - bucket_h, random_crop, rng)
    if fast and isinstance(img, np.ndarray) and img.shape[:2] != (resized_h, resized_w):
        mode = torch_filter(interpolation, (img.shape[1], img.shape[0]), (resized_w, resized_h))
        if mode is not None:
            resized = _resize_torch(img, (resized_w, resized_h), mode)
            out = resized[top : top + bucket_h, left : left + bucket_w]
            return (out[:, ::-1] if flip else out), (top, left)
    pil = img if isinstance(img, Image.Image) else _to_pillow(img)
    if pil.size != (resized_w, resized_h):
        resample = choose_filter(interpolation, pil.size, (resized_w, resized_h))
        pil = _resize_straight(pil, (resized_w, resized_h), resample)
    out = np.asarray(pil)[top : top + bucket_h, left : left + bucket_w]
    if flip:
        out = out[:, ::-1]
    return np.array(out, order="C"), (top, left)


def torch_filter(
    interpolation: str | None, src_wh: tuple[int, int], dst_wh: tuple[int, int]
) -> str | None:
    """The ``torch.nn.functional.interpolate`` mode that stands in for a filter, or ``None``.

    sd-scripts' default (``None``) and ``area`` shrink with antialiased ``bilinear`` (area averaging
    is a box filter; the antialiased triangle filter is at least as free of aliasing and measured
    47 dB against OpenCV's ``INTER_AREA`` on photo-like images). An image that grows (sd-scripts'
    ``lanczos``) uses ``bicubic``: 52 dB against Pillow's ``LANCZOS`` on the benchmark set, at a
    fifth of its time. ``bilinear``/``linear`` and ``bicubic``/``cubic`` map to themselves.
    ``lanczos``, ``box`` and ``nearest``, asked for by name, return ``None``: Pillow does them.
    """
    if interpolation is None or interpolation == "area":
        grows = dst_wh[0] > src_wh[0] or dst_wh[1] > src_wh[1]
        if interpolation == "area" and grows:
            return "bilinear"  # as `choose_filter`: area that grows is bilinear
        return "bicubic" if grows else "bilinear"
    return {
        "bilinear": "bilinear",
        "linear": "bilinear",
        "bicubic": "bicubic",
        "cubic": "bicubic",
    }.get(interpolation)


def _resize_torch(img: np.ndarray, size_wh: tuple[int, int], mode: str) -> np.ndarray:
    """Antialiased resize of a ``uint8`` ``(H, W, C)`` array with torch; a writable ``(h, w, C)`` array.

    The array is handed to torch as a channels-last ``(1, C, H, W)`` view, the layout of torch's
    vectorised ``uint8`` antialiased kernels (3 or 4 channels). torch 2.13 returns the result
    planar (contiguous ``(1, C, h, w)``; its kernel packs it so), and the ``(h, w, C)`` numpy view
    returned is a transposed view of it without a copy, whose colour planes have contiguous rows
    for the float conversion. (Decoding to 4 channels, RGBX, to spare torch its 3-to-4-channel
    unpacking was measured: no faster.) Colour and alpha are resized alike
    (straight alpha, as OpenCV does). The result is deterministic for any thread count: each output
    pixel is one fixed weighted sum.
    """
    pixels = np.ascontiguousarray(img)
    with warnings.catch_warnings():
        # Pillow's buffers are read-only; torch only reads this one, so its warning does not apply.
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(pixels)
    nchw = source.permute(2, 0, 1).unsqueeze(0)
    out = torch.nn.functional.interpolate(
        nchw, size=(size_wh[1], size_wh[0]), mode=mode, antialias=True, align_corners=False
    )
    hwc: np.ndarray = out[0].permute(1, 2, 0).numpy()
    return hwc


def _trim_offset(excess: int, random_crop: bool, rng: np.random.Generator) -> int:
    """sd-scripts' trim start: ``excess // 2``, or ``random.randint(0, excess)`` with random crop."""
    if excess <= 0:
        return 0
    return int(rng.integers(0, excess + 1)) if random_crop else excess // 2


def _to_pillow(img: np.ndarray) -> Image.Image:
    """Wrap an ``(H, W, 3|4)`` uint8 array; 4 channels become RGBX so resizing never premultiplies."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 (H, W, 3 or 4) array, got {img.dtype} {img.shape}")
    arr = np.ascontiguousarray(img)
    if arr.shape[2] == 3:
        return Image.fromarray(arr)
    height, width = arr.shape[:2]
    return Image.frombuffer("RGBX", (width, height), arr, "raw", "RGBX", 0, 1)


def _resize_straight(
    im: Image.Image, size: tuple[int, int], resample: Image.Resampling
) -> Image.Image:
    """Resize with straight alpha: Pillow premultiplies RGBA, OpenCV (and sd-scripts' area) does not."""
    if im.mode == "RGBA":
        im = Image.frombuffer("RGBX", im.size, im.tobytes(), "raw", "RGBX", 0, 1)
    return im.resize(size, resample)


def conditioning_crop_top_left(
    original_wh: tuple[int, int], bucket_wh: tuple[int, int], *, flipped: bool = False
) -> tuple[int, int]:
    """Return the ``(top, left)`` that sd-scripts feeds SDXL as ``crop_top_lefts`` for a bucketed image.

    sd-scripts does not report the crop it made. It computes ``get_crop_ltrb``: the offsets of the
    image *fitted inside* the bucket (letterboxed, sides in float), floor-divided by 2; with flip the
    left becomes ``bucket_w - crop_right``; then both are truncated to int. Random crop offsets are not
    reflected (its source says so). This reproduces that arithmetic so conditioning matches
    sd-scripts; the offset of the crop actually made is what `resize_crop` returns.
    """
    bucket_w, bucket_h = bucket_wh
    image_ar = original_wh[0] / original_wh[1]
    if bucket_w / bucket_h > image_ar:
        fit_w, fit_h = bucket_h * image_ar, float(bucket_h)
    else:
        fit_w, fit_h = float(bucket_w), bucket_w / image_ar
    crop_left = (bucket_w - fit_w) // 2
    crop_top = (bucket_h - fit_h) // 2
    if flipped:
        crop_left = bucket_w - (crop_left + fit_w)
    return int(crop_top), int(crop_left)


# --------------------------------------------------------------------------------------------------
# Face crop (face_crop_aug_range)


def parse_face_info(stem: str) -> tuple[int, int, int, int] | None:
    """Parse ``name_cx_cy_w_h`` from a file stem, as sd-scripts does for ``face_crop_aug_range``.

    sd-scripts splits the stem on ``_`` and, when there are at least five parts, reads the last four
    as integers: face centre x, centre y, width, height in original pixels. It uses them only when
    the centre x is above 0. This returns ``None`` wherever sd-scripts would not face-crop: fewer than
    five parts, or centre x of 0 or less. Where sd-scripts would crash on a part that is not an
    integer (``int()`` raising), this returns ``None`` too.
    """
    tokens = stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(token) for token in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if cx > 0 else None


def face_crop(
    img: np.ndarray,
    *,
    face_center_wh: tuple[int, int],
    face_size_wh: tuple[int, int],
    face_crop_aug_range: tuple[float, float],
    resolution_wh: tuple[int, int],
    rng: np.random.Generator,
    random_crop: bool = False,
    interpolation: str | None = None,
) -> np.ndarray:
    """Scale and crop around a face to ``resolution_wh``, as sd-scripts' ``crop_target`` does.

    sd-scripts uses this only without bucketing and when the file name carries face info
    (`parse_face_info`). The scale is drawn uniformly between the scales at which the face's longer
    side, ``max(w, h)``, spans ``1 / range[1]`` and ``1 / range[0]`` of the resolution's shorter side,
    never below the scale that just covers the resolution and never above 1 (it never enlarges).
    Then, per axis, height first, the window is centred on the face; with ``random_crop`` it is moved
    by ``randint(0, r) + randint(0, r) - r`` (``r`` the longer distance from the face centre to an
    edge), otherwise, when the range is not a single value and the face is at least 40 pixels and a
    tenth of the resolution, by ``randint(-size // 20, size // 20)`` (Python floor division, so the
    range leans one pixel negative); the window is clamped into the image.

    Args:
        img: ``uint8`` array ``(H, W, C)``.
        face_center_wh: Face centre ``(cx, cy)`` in original pixels.
        face_size_wh: Face ``(w, h)`` in original pixels.
        face_crop_aug_range: ``(min, max)`` from the dataset config.
        resolution_wh: Target ``(width, height)``.
        rng: Source of the scale and offsets.
        random_crop: sd-scripts' ``random_crop`` for the subset.
        interpolation: An sd-scripts ``resize_interpolation`` name or ``None``.

    Returns:
        A new ``(height, width, C)`` array, or ``img`` itself when it already has that size.

    Raises:
        ImageProblem: The image is smaller than the resolution (sd-scripts fails an assertion).
    """
    height, width = img.shape[:2]
    res_w, res_h = resolution_wh
    if (width, height) == (res_w, res_h):
        return img
    scale = _face_scale((width, height), max(face_size_wh), face_crop_aug_range, resolution_wh, rng)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    if new_w < res_w or new_h < res_h:
        raise ImageProblem(
            f"image {width}x{height} is smaller than resolution {res_w}x{res_h}; face crop never enlarges"
        )
    if (new_w, new_h) != (width, height):
        resample = choose_filter(interpolation, (width, height), (new_w, new_h))
        img = np.asarray(_resize_straight(_to_pillow(img), (new_w, new_h), resample))
    face_size = max(face_size_wh)
    centre = (int(face_center_wh[1] * scale + 0.5), int(face_center_wh[0] * scale + 0.5))
    jitter = face_crop_aug_range[0] != face_crop_aug_range[1] and face_size >= 40
    jitter = jitter and face_size > min(res_w, res_h) // 10
    starts = []
    for target, length, face_p in zip((res_h, res_w), (new_h, new_w), centre, strict=True):
        start = face_p - target // 2
        if random_crop:
            reach = max(length - face_p, face_p)
            start += int(rng.integers(0, reach + 1)) + int(rng.integers(0, reach + 1)) - reach
        elif jitter:
            start += int(rng.integers(-face_size // 20, face_size // 20 + 1))
        starts.append(max(0, min(start, length - target)))
    top, left = starts
    return np.array(img[top : top + res_h, left : left + res_w], order="C")


def _face_scale(
    size_wh: tuple[int, int],
    face_size: int,
    aug_range: tuple[float, float],
    resolution_wh: tuple[int, int],
    rng: np.random.Generator,
) -> float:
    """The scale of sd-scripts' ``crop_target``: cover the resolution, face within range, never enlarge."""
    res_w, res_h = resolution_wh
    short = min(res_w, res_h)
    cover = max(res_h / size_wh[1], res_w / size_wh[0])
    face = max(face_size, 1)  # sd-scripts divides by the face size; 0 would raise there
    min_scale = min(1.0, max(cover, short / (face * aug_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face * aug_range[0])))
    if min_scale >= max_scale:
        return min_scale
    return float(rng.uniform(min_scale, max_scale))


# --------------------------------------------------------------------------------------------------
# Colour augmentation

_HUE_SHIFT_LIMIT = 8.0  # in OpenCV's 8-bit hue units of 2 degrees
_HSV_SHIFT = 12  # OpenCV's fixed-point shift for 8-bit RGB -> HSV


def _fixed_point_table(numerator: float, divisor_scale: float) -> np.ndarray:
    """OpenCV's reciprocal tables: ``round(numerator / (divisor_scale * i))`` with entry 0 = 0."""
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        table = np.where(i > 0, np.rint(numerator / (divisor_scale * np.maximum(i, 1))), 0)
    return table.astype(np.int64)


_SDIV = _fixed_point_table(255 << _HSV_SHIFT, 1.0)
_HDIV = _fixed_point_table(180 << _HSV_SHIFT, 6.0)


def color_aug(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """sd-scripts' ``color_aug``: with probability 0.33, a hue shift or a raw "gamma", half each.

    This follows sd-scripts' ``AugHelper.color_aug`` (which replaced albumentations' ``OneOf`` of
    ``HueSaturationValue(8, 0, 0)`` and ``RandomGamma(95, 105)``, ``p=0.33``):

    - hue shift: OpenCV's 8-bit HSV, hue in units of 2 degrees, shifted by ``uniform(-8, 8)``
      modulo 180 and truncated to an integer. sd-scripts passes RGB pixels to ``COLOR_BGR2HSV``; the
      same channel order is kept here, which turns the shift the other way round the colour wheel,
      harmless because the shift is symmetric. Reimplemented from OpenCV's 8-bit formulas; against
      OpenCV 4.8.1 (sd-scripts' pin) it is identical on 99.99% of values and never 1 apart more, for
      widths that are multiples of 32, as bucket widths are (OpenCV rounds a row's last few pixels).
    - gamma: ``clip(x ** g, 0, 255)`` on the raw 0..255 values with ``g = uniform(0.95, 1.05)``,
      truncated. Unlike albumentations' RandomGamma this does not normalise to 0..1 first, so it is
      a strong brightness change: g = 0.95 maps 255 to 193, g = 1.05 saturates everything above 195.

    Only the first three channels change; alpha is kept. Returns ``img`` itself when no augmentation
    is drawn, otherwise a new array.
    """
    if rng.random() > 0.33:
        return img
    out = np.array(img, order="C")
    if rng.random() > 0.5:
        shift = float(rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT))
        out[..., :3] = _shift_hue(out[..., :3], shift)
    else:
        gamma = float(rng.uniform(0.95, 1.05))
        lut = np.clip(np.arange(256, dtype=np.float64) ** gamma, 0, 255).astype(np.uint8)
        out[..., :3] = lut[out[..., :3]]
    return out


def _shift_hue(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Round-trip through OpenCV's 8-bit HSV with the hue moved by ``shift`` (2-degree units)."""
    hue, sat, val = _bgr2hsv_u8(rgb)
    if shift < 0:
        shift = 180 + shift
    # sd-scripts writes the float sum back into a uint8 array, which truncates toward zero.
    hue = np.mod(hue + shift, 180).astype(np.uint8)
    return _hsv2bgr_u8(hue, sat, val)


def _bgr2hsv_u8(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's ``COLOR_BGR2HSV`` for uint8 (fixed point, hue 0..179), channel 0 read as blue."""
    b, g, r = (bgr[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return h, s, v


def _hsv2bgr_u8(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_HSV2BGR`` for uint8: float32 sectors, truncated back to integers."""
    hf = h.astype(np.float32) * np.float32(6.0 / 180.0)
    sf = s.astype(np.float32) * np.float32(1.0 / 255.0)
    vf = v.astype(np.float32) * np.float32(1.0 / 255.0)
    sector = np.floor(hf).astype(np.int64)  # hue <= 179, so hf < 6 and no wrap is needed
    frac = hf - sector.astype(np.float32)
    tab = np.stack([vf, vf * (1 - sf), vf * (1 - sf * frac), vf * (1 - sf * (1 - frac))])
    # OpenCV's sector_data: which tab entry feeds b, g and r in each of the six sectors.
    sectors = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    picks = sectors[sector]
    out = np.take_along_axis(tab, np.moveaxis(picks, -1, 0), axis=0)
    out = np.where(sf[None] == 0, vf[None], out)
    # OpenCV's vectorised loop, which converts all but a few trailing pixels, truncates; it does not round.
    return np.clip(np.moveaxis(out, 0, -1) * np.float32(255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Tensors


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """Return a ``(3, H, W)`` float32 tensor in [-1, 1], ``x / 127.5 - 1``, from the RGB channels.

    This matches sd-scripts' ``ToTensor()`` plus ``Normalize([0.5], [0.5])`` up to float rounding.
    A fourth (alpha) channel is dropped, as sd-scripts drops it; use `alpha_to_mask` for it.
    """
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected a uint8 (H, W, C) array, got {img.dtype} {img.shape}")
    rgb = img[..., :3]
    if not rgb.flags.writeable:
        rgb = rgb.copy()  # torch.from_numpy warns on read-only arrays
    source = torch.from_numpy(rgb).permute(2, 0, 1)
    out = torch.empty(source.shape, dtype=torch.float32)
    out.copy_(source)
    return out.div_(127.5).sub_(1.0)


def alpha_to_mask(img: np.ndarray) -> np.ndarray:
    """Return the alpha channel as float32 ``(H, W)`` in 0..1, or ones when there is no alpha.

    This is sd-scripts' ``alpha_mask`` for a loaded image: ``alpha / 255``, all ones for 3 channels.
    """
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3 or 4) array, got {img.shape}")
    if img.shape[2] == 3:
        return np.ones(img.shape[:2], dtype=np.float32)
    return img[..., 3].astype(np.float32) / np.float32(255.0)
