"""Image sizes from the first bytes of a file, for JPEG, PNG and WebP, or ``None`` when unsure.

The scan needs the upright size of every image. Pillow's ``Image.open`` finds it too, but parses
each header in Python objects (about 100 us a file, under the GIL); a million files then take
minutes. `header_size` reads the same fields from the raw bytes in a few microseconds.

It answers only when it is certain that Pillow would open the file with that size and EXIF
orientation. Anything it does not model returns ``None`` and the caller asks Pillow, which then
gives the same answer or the same reason for refusing the file as it always did. "Certain" here
means the parser checks what Pillow's own parser checks before it returns an image (and refuses
what Pillow would warn about):

- JPEG: every marker from SOI through the SOS segment is read as Pillow reads it (segment
  lengths, fill bytes, quantisation tables, 8-bit precision, 1, 3 or 4 components, the JFIF,
  Adobe and ICC segments Pillow indexes into, Photoshop resource blocks); the size is the one
  SOFn frame's. The orientation is the EXIF ``Orientation`` (tag 274, one SHORT) of IFD0 of the
  single ``Exif`` APP1 segment, whose IFD0 must lie wholly inside the segment; without it, an
  XMP ``tiff:Orientation`` as Pillow's ``getexif`` reads it. MPF (camera MPO) files, DHP or
  standalone markers before SOS, a second SOF or Exif segment, and anything unexpected: ``None``.
- PNG: the signature, IHDR first (length, colour type and bit depth Pillow knows, filter method
  0), and every chunk up to IDAT complete with a correct CRC. Only chunks whose Pillow handler
  cannot fail or change the orientation are passed (PLTE, gAMA, cHRM, sRGB, pHYs, tRNS of the
  length Pillow reads for the colour type, iCCP that Pillow inflates without an error, tEXt
  other than ``exif``, and chunks Pillow has no handler for); eXIf, zTXt, iTXt, and APNG
  chunks: ``None``. The orientation is
  therefore always 1 (stoker reads PNG EXIF only from header chunks).
- WebP: the whole RIFF container must be present in the file and its chunks well formed, as
  libwebp's demuxer (which Pillow uses) requires. A simple VP8 (lossy) or VP8L (lossless) file,
  or a still VP8X file with one image of the canvas size (optional ALPH before a VP8 image, and
  ICCP, EXIF and XMP chunks, each present exactly when its flag is set). Animated files:
  ``None``. The orientation comes from the EXIF chunk, or the XMP chunk, as for JPEG.

Pillow's decompression-bomb limits are not applied here: the caller hands any size over
``PIL.Image.MAX_IMAGE_PIXELS`` to Pillow, which warns or refuses as before.

The functions are pure (bytes in, numbers out) so they are cheap to test exhaustively against
Pillow, which ``tests/data/test_headers.py`` does, including on mutated and truncated files.
"""

from __future__ import annotations

import re
import zlib
from typing import Final, Literal

__all__ = ["HEAD_BYTES", "MORE", "header_size"]

HEAD_BYTES: Final = 65536
"""Read this many bytes first; on `MORE`, read up to `MAX_HEAD_BYTES` and ask again."""
MAX_HEAD_BYTES: Final = 1 << 20


class _More:
    """The answer needs bytes past the end of the ``data`` given (and the file has more)."""

    def __repr__(self) -> str:
        return "MORE"


MORE: Final = _More()

Size = tuple[int, int, int]
"""``(width, height, orientation)``: the stored (not rotated) size and the EXIF orientation 1-8."""


def header_size(
    data: bytes, extension: str, file_size: int, *, png_text_limit: int = 1 << 20
) -> Size | _More | None:
    """The stored size and EXIF orientation of an image from its first bytes.

    Args:
        data: The first bytes of the file (all of it, or a prefix).
        extension: The file's extension, lower case with the dot (``".jpg"``). Only the format the
            extension promises is parsed, as stoker opens files only as their names promise.
        file_size: The file's size in bytes, so a prefix can be told from a cut-off file.
        png_text_limit: Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` (a PNG whose ICC profile
            inflates past it is refused by Pillow, so the reader says None).

    Returns:
        ``(width, height, orientation)`` with the size as stored (orientations 5 to 8 mean the
        upright image is ``height x width``); `MORE` when the answer lies past ``data`` in a longer
        file; ``None`` when this reader cannot be sure of Pillow's answer.
    """
    complete = len(data) >= file_size
    if extension in (".jpg", ".jpeg"):
        answer = _jpeg(data)
    elif extension == ".png":
        answer = _png(data, png_text_limit)
    elif extension == ".webp":
        return _webp(data, file_size)
    else:
        return None
    if answer is MORE and complete:
        return None  # the file ends inside the header: Pillow says how
    return answer


# --- JPEG ------------------------------------------------------------------------------------------

_SOF: Final = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
)
# Segments Pillow reads and drops (its "Skip" handler): DHT, DAC, DNL, DRI, EXP, and COM.
_SKIPPED: Final = frozenset((0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE))
_SOS: Final = 0xDA
_DQT: Final = 0xDB
_EXIF_HEADER: Final = b"Exif\0\0"
_XMP_HEADER: Final = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION: Final = re.compile(rb'tiff:Orientation(="|>)([0-9])')


# What each marker byte after 0xFF means to the parser (0: let Pillow decide).
_REFUSE, _SKIP, _FRAME, _TABLES, _APPN, _SCAN = range(6)
_MARKER_KIND: Final = bytes(
    _FRAME if m in _SOF else
    _SKIP if m in _SKIPPED else
    _TABLES if m == _DQT else
    _SCAN if m == _SOS else
    _APPN if 0xE0 <= m <= 0xEF else
    _REFUSE  # SOI again, EOI, RSTn, JPGn, DHP, TEM or no marker
    for m in range(256)
)  # fmt: skip


def _jpeg(data: bytes) -> Size | _More | None:
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    end = len(data)
    pos = 2
    size: tuple[int, int] | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    while True:
        if pos + 4 > end:
            return MORE
        if data[pos] != 0xFF:
            return None  # Pillow skips junk between markers; not worth modelling
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        kind = _MARKER_KIND[marker]
        if kind == _REFUSE:
            return None
        body = pos + 4
        stop = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if stop < body:
            return None  # a length under 2
        if stop > end:
            return MORE
        if kind == _SCAN:
            break
        if kind == _FRAME:
            if size is not None or not _good_sof(data, body, stop):
                return None
            size = ((data[body + 3] << 8) | data[body + 4], (data[body + 1] << 8) | data[body + 2])
        elif kind == _TABLES:
            if not _good_dqt(data, body, stop):
                return None
        elif kind == _APPN:
            segment = data[body:stop]
            app = _app_segment(marker, segment)
            if app is None:
                return None
            if app == "exif":
                if exif is not None:
                    return None  # Pillow joins a second Exif segment onto the first
                exif = segment
            elif app == "xmp":
                xmp = segment.split(b"\x00", 1)[1]
        pos = stop
    if size is None or size[0] == 0 or size[1] == 0:
        return None
    orientation = _orientation(exif, xmp)
    if orientation is None:
        return None
    return size[0], size[1], orientation


def _good_sof(data: bytes, body: int, stop: int) -> bool:
    """What Pillow's SOF handler needs: 8-bit samples, 1, 3 or 4 components, whole triples."""
    return (
        stop - body >= 6
        and (stop - body - 6) % 3 == 0
        and data[body] == 8
        and data[body + 5] in (1, 3, 4)
    )


def _good_dqt(data: bytes, pos: int, stop: int) -> bool:
    """Pillow's DQT loop: each table is 1 + 64 or 1 + 128 bytes, none cut short."""
    while pos < stop:
        pos += 65 if data[pos] < 16 else 129
    return pos == stop


def _app_segment(marker: int, segment: bytes) -> str | None:
    """``"exif"``, ``"xmp"`` or ``"other"`` for an APPn segment Pillow reads without failing, else None."""
    if marker == 0xE1:
        if segment.startswith(_EXIF_HEADER):
            return "exif"
        if segment.startswith(_XMP_HEADER):
            return "xmp"
    elif marker == 0xE0 and segment.startswith(b"JFIF"):
        return "other" if len(segment) >= 7 else None  # Pillow reads the version at 5
    elif marker == 0xE2:
        if segment.startswith(b"MPF\0"):
            return None  # a camera MPO: Pillow opens it with another plugin
        if segment.startswith(b"ICC_PROFILE\0") and len(segment) < 14:
            return None  # Pillow indexes byte 13 of the sorted fragments
    elif marker == 0xEE and segment.startswith(b"Adobe"):
        return "other" if len(segment) >= 7 else None
    elif marker == 0xED and segment.startswith(b"Photoshop 3.0\x00"):
        return "other" if _good_photoshop(segment) else None
    return "other"


def _good_photoshop(segment: bytes) -> bool:
    """Pillow's walk of the Photoshop resource blocks must not index past the end (IndexError).

    Its short reads of the code, size and ResolutionInfo fields are ``struct.error``, which it
    catches and stops at; only the resource name length is read by indexing.
    """
    pos = 14
    while segment[pos : pos + 4] == b"8BIM":
        pos += 4
        if pos + 2 > len(segment):
            return True
        pos += 2
        if pos >= len(segment):
            return False
        pos += 1 + segment[pos]
        pos += pos & 1
        if pos + 4 > len(segment):
            return True
        pos += 4 + int.from_bytes(segment[pos : pos + 4], "big")
        pos += pos & 1
    return True


def _orientation(exif: bytes | None, xmp: bytes | None) -> int | None:
    """The orientation stoker would read from these segments (1 when absent), or None if unsure."""
    found = _exif_orientation(exif) if exif is not None else 0
    if found is None:
        return None
    if found == 0 and xmp is not None:
        match = _XMP_ORIENTATION.search(xmp)
        found = int(match[2]) if match else 0
    return found if 1 <= found <= 8 else 1


# TIFF field types Pillow loads, by size in bytes of one value.
_TIFF_UNIT: Final = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}


def _exif_orientation(exif: bytes) -> int | None:
    """Tag 274 of IFD0 (0 when absent), or None when Pillow might read the block differently.

    IFD0 must lie wholly inside the block with every value in reach, so Pillow reads it all
    without a warning; the tag must be one SHORT (what cameras write).
    """
    tiff = exif
    for _ in range(2):  # Pillow strips up to two Exif headers
        if tiff.startswith(_EXIF_HEADER):
            tiff = tiff[6:]
    if not tiff:
        return 0
    order: Literal["little", "big"]
    if tiff.startswith(b"II*\0"):
        order = "little"
    elif tiff.startswith(b"MM\0*"):
        order = "big"
    else:
        return None
    if len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    if ifd + 2 + 12 * count + 4 > len(tiff):
        return None
    found = 0
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag = int.from_bytes(tiff[entry : entry + 2], order)
        kind = int.from_bytes(tiff[entry + 2 : entry + 4], order)
        number = int.from_bytes(tiff[entry + 4 : entry + 8], order)
        unit = _TIFF_UNIT.get(kind)
        if unit is None:
            return None
        if number * unit > 4:
            offset = int.from_bytes(tiff[entry + 8 : entry + 12], order)
            if offset + number * unit > len(tiff):
                return None
        if tag == 0x0112:
            if found or kind != 3 or number != 1:
                return None
            found = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            if found == 0:
                return None  # stoker reads 0 as upright, "absent" would consult XMP
    return found


# --- PNG -------------------------------------------------------------------------------------------

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) pairs of the PNG specification, all of which Pillow opens.
_PNG_MODES: Final = frozenset(
    (
        (1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3),
        (8, 4), (16, 4), (8, 6), (16, 6),
    )
)  # fmt: skip
# Chunks with a Pillow handler that cannot fail once this long (or at all), and change no size.
_PNG_SAFE: Final = {b"PLTE": 0, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tEXt": 0}
# tRNS bytes Pillow's handler reads, by IHDR colour type (grey: one 16-bit value, RGB: three).
_TRNS_MINIMUM: Final = {0: 2, 2: 6, 3: 0, 4: 0, 6: 0}
# Every chunk Pillow has a handler for (PngStream.chunk_*); a test keeps this list in step.
PNG_HANDLED: Final = frozenset(
    b"IHDR IDAT IEND PLTE tRNS gAMA cHRM sRGB pHYs tEXt zTXt iTXt eXIf iCCP acTL fcTL fdAT".split()
)


def _png(data: bytes, text_limit: int) -> Size | _More | None:
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = 8
    size: tuple[int, int] | None = None
    colour = 0
    while True:
        if pos + 8 > len(data):
            return MORE
        length = int.from_bytes(data[pos : pos + 4], "big")
        cid = data[pos + 4 : pos + 8]
        if not (cid.isalpha() and cid.isascii()):
            return None
        if cid == b"IDAT":
            break
        if (pos == 8) != (cid == b"IHDR"):
            return None  # IHDR comes first, once
        stop = pos + 12 + length
        if stop > len(data):
            return MORE
        body = data[pos + 8 : pos + 8 + length]
        if zlib.crc32(body, zlib.crc32(cid)) != int.from_bytes(data[stop - 4 : stop], "big"):
            return None
        if cid == b"IHDR":
            if length < 13 or (body[8], body[9]) not in _PNG_MODES or body[11] != 0:
                return None
            size = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            colour = body[9]
        elif cid == b"tRNS":
            if length < _TRNS_MINIMUM[colour]:
                return None  # Pillow: "Truncated tRNS chunk"
        elif cid == b"iCCP":
            if not _good_iccp(body, text_limit):
                return None
        elif cid in PNG_HANDLED:
            minimum = _PNG_SAFE.get(cid)
            if minimum is None or length < minimum:
                return None
            if cid == b"tEXt" and body.split(b"\0", 1)[0] == b"exif":
                return None  # Pillow takes this one for EXIF
        pos = stop
    if size is None or size[0] == 0 or size[1] == 0 or max(size) >= 1 << 31:
        return None
    return size[0], size[1], 1


def _good_iccp(body: bytes, text_limit: int) -> bool:
    """Pillow's iCCP handler succeeds: a compression byte after the name, method 0, and a
    profile that inflates within ``text_limit`` (corrupt zlib data it ignores)."""
    name_end = body.find(b"\0")
    if name_end + 1 >= len(body) or body[name_end + 1] != 0:
        return False  # IndexError or "Unknown compression method" in Pillow
    inflater = zlib.decompressobj()
    try:
        inflater.decompress(body[name_end + 2 :], text_limit)
    except zlib.error:
        return True  # Pillow drops the profile and goes on
    except ValueError:
        return False
    return not inflater.unconsumed_tail


# --- WebP ------------------------------------------------------------------------------------------

_VP8X_VALID_FLAGS: Final = 0x3E  # ICC, alpha, EXIF, XMP, animation
_VP8X_ANIMATION: Final = 0x02


def _webp(data: bytes, file_size: int) -> Size | _More | None:
    if len(data) < 30 or not (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
        return None
    riff = int.from_bytes(data[4:8], "little")
    if riff < 12 or riff & 1 or riff + 8 > file_size:
        return None  # libwebp refuses a file shorter than its RIFF size
    end = riff + 8
    chunks: list[tuple[bytes, int, int]] = []  # (fourcc, start of payload, payload size)
    pos = 12
    while pos < end:
        if pos + 8 > end:
            return None
        if pos + 8 > len(data):
            return MORE
        fourcc = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        stop = pos + 8 + size + (size & 1)
        if stop > end:
            return None
        chunks.append((fourcc, pos + 8, size))
        pos = stop
    first = chunks[0][0]
    if first in (b"VP8 ", b"VP8L"):
        if len(chunks) != 1:
            return None
        frame = _webp_frame(data, *chunks[0])
        if not isinstance(frame, tuple):
            return frame
        return frame[0], frame[1], 1
    if first != b"VP8X":
        return None
    return _webp_extended(data, chunks)


def _webp_frame(
    data: bytes, fourcc: bytes, start: int, size: int
) -> tuple[int, int] | _More | None:
    """Width and height of a VP8 or VP8L bitstream, checked as libwebp's GetInfo checks them."""
    if start + 10 > len(data):
        return MORE
    head = data[start : start + 10]
    if fourcc == b"VP8 ":
        if size < 10:
            return None
        bits = head[0] | head[1] << 8 | head[2] << 16
        keyframe, profile, shown, partition = (
            not bits & 1,
            (bits >> 1) & 7,
            (bits >> 4) & 1,
            bits >> 5,
        )
        if not keyframe or profile > 3 or not shown or partition >= size:
            return None
        if head[3:6] != b"\x9d\x01\x2a":
            return None
        width = int.from_bytes(head[6:8], "little") & 0x3FFF
        height = int.from_bytes(head[8:10], "little") & 0x3FFF
        return (width, height) if width and height else None
    if fourcc == b"VP8L":
        if size < 5 or head[0] != 0x2F:
            return None
        bits = int.from_bytes(head[1:5], "little")
        if bits >> 29:
            return None  # version must be 0
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _webp_extended(data: bytes, chunks: list[tuple[bytes, int, int]]) -> Size | _More | None:
    """A still VP8X file: one image of the canvas size, with optional alpha, ICC, EXIF and XMP."""
    _, start, size = chunks[0]
    if size < 10 or start + 10 > len(data):
        return None if size < 10 else MORE
    flags = data[start]
    if flags & ~_VP8X_VALID_FLAGS & 0xFF or flags & _VP8X_ANIMATION:
        return None
    width = int.from_bytes(data[start + 4 : start + 7], "little") + 1
    height = int.from_bytes(data[start + 7 : start + 10], "little") + 1
    if width * height >= 1 << 32:
        return None
    named: dict[bytes, tuple[int, int]] = {}
    order = [fourcc for fourcc, _, _ in chunks[1:]]
    for fourcc, begin, length in chunks[1:]:
        if fourcc not in (b"ICCP", b"EXIF", b"XMP ", b"ALPH", b"VP8 ", b"VP8L") or fourcc in named:
            return None
        named[fourcc] = (begin, length)
    for fourcc, flag in ((b"ICCP", 0x20), (b"EXIF", 0x08), (b"XMP ", 0x04)):
        if (fourcc in named) != bool(flags & flag):
            return None  # libwebp hides a metadata chunk whose flag is not set
    images = [f for f in order if f in (b"VP8 ", b"VP8L")]
    if len(images) != 1:
        return None
    if b"ALPH" in named and (images[0] != b"VP8 " or order.index(b"ALPH") > order.index(images[0])):
        return None
    frame = _webp_frame(data, images[0], *named[images[0]])
    if not isinstance(frame, tuple):
        return frame
    if frame != (width, height):
        return None
    metadata: dict[bytes, bytes] = {}
    for fourcc in (b"EXIF", b"XMP "):
        if fourcc in named:
            begin, length = named[fourcc]
            if begin + length > len(data):
                return MORE
            metadata[fourcc] = data[begin : begin + length]
    orientation = _orientation(metadata.get(b"EXIF") or None, metadata.get(b"XMP ") or None)
    if orientation is None:
        return None
    return width, height, orientation
