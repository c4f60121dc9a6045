"""Names of the one-image-per-format files the data tests write (tests/data/conftest.py)."""

FORMAT_NAMES = (
    "photo.jpg",
    "wide.JPG",
    "alpha.png",
    "palette.png",
    "deep16.png",
    "web.webp",
    "cmyk.jpg",
    "rotated.jpg",
    "plain.bmp",
)
