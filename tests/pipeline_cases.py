"""Input images for the pipeline tests: normal ones plus every kind of broken or unusual file.

Each case is made in memory with Pillow (or by hand, for headers Pillow would refuse to write) and says
what the images table must hold for it: the error kind, or the decoded size for a good image.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


@dataclasses.dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    error_kind: str | None  # None: decodes and is labelled
    size: tuple[int, int] | None  # (width, height) after EXIF orientation, for good images


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def shapes_image(seed: int, width: int, height: int) -> Image.Image:
    """An RGB picture of a few filled shapes on a noisy background (something for a model to segment)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 120, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        size = int(rng.integers(10, max(11, min(width, height) // 2)))
        colour = tuple(int(c) for c in rng.integers(150, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=colour)
    return image


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` × ``height`` pixels with almost no pixel data (nothing allocated)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def image_cases(num_normal: int = 12) -> list[ImageCase]:
    """``num_normal`` ordinary JPEGs plus the special cases (all different sizes, all small)."""
    cases = []
    for index in range(num_normal):
        width, height = 64 + 8 * index, 48 + 4 * index
        cases.append(ImageCase(f"normal_{index:02d}.jpg", _encode(shapes_image(index, width, height), "JPEG"),
                               None, (width, height)))
    picture = shapes_image(100, 80, 48)
    jpeg = _encode(picture, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    grey16 = Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1)))
    cases += [
        ImageCase("truncated.jpg", jpeg[: len(jpeg) // 2], "corrupt", None),
        ImageCase("zero_bytes.jpg", b"", "empty", None),
        ImageCase("text_file.jpg", b"this is a text file, not a picture\n", "not_an_image", None),
        ImageCase("huge_dimensions.png", huge_png_header(50_000, 50_000), "too_large", None),
        ImageCase("cmyk.jpg", _encode(picture.convert("CMYK"), "JPEG"), None, (80, 48)),
        ImageCase("grey16.png", _encode(grey16, "PNG"), None, (40, 30)),
        ImageCase("exif_rotated.jpg", _encode(picture, "JPEG", exif=exif), None, (48, 80)),
        ImageCase("palette.png", _encode(picture.convert("P"), "PNG"), None, (80, 48)),
        ImageCase("palette_transparent.png", _encode(picture.convert("P"), "PNG", transparency=0), None, (80, 48)),
        ImageCase("rgba.png", _encode(picture.convert("RGBA"), "PNG"), None, (80, 48)),
        ImageCase("grey.jpg", _encode(picture.convert("L"), "JPEG"), None, (80, 48)),
        ImageCase("bilevel.png", _encode(picture.convert("1"), "PNG"), None, (80, 48)),
    ]
    return cases
