"""The one image decoder of the project: encoded bytes -> RGB uint8 in display orientation.

The labeller, the training jobs and the label viewers all decode with `decode_image`, so the model sees
the same pixels in training and in labelling, and the overlays are drawn in the frame of the label tables.
Greyscale, RGBA, CMYK, palette, 1-bit and 16-bit images are made RGB (16-bit by keeping the high byte, so
the full range maps to 0..255 instead of saturating to a few grey levels as Pillow's `convert("RGB")` does).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What a folder or prefix listing treats as an image (lower-case suffixes). A glob or a manifest is
# taken as given: the user named those files, so each of them ends up labelled or as an error row.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Decompression-bomb limit: an image of more pixels is an error row (`too_large`) found from its header,
# before any pixel is decoded. 100 MP is above any camera or scanned page we expect (a 12000×8000 frame
# is 96 MP) and its RGB buffer (300 MB) still fits a worker several times over.
MAX_IMAGE_PIXELS = 100_000_000

# error_kind values this stage writes (the model stage adds its own).
UNREADABLE = "unreadable"  # the bytes could not be fetched (missing, permission, network)
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no known image format (e.g. a text file named .jpg)
CORRUPT = "corrupt"  # a known format that fails to decode (truncated, damaged)
TOO_LARGE = "too_large"  # more than MAX_IMAGE_PIXELS pixels

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DecodeError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → [H, W, 3] uint8 RGB in display orientation. Raises `DecodeError` with a kind."""
    if not data:
        raise DecodeError(EMPTY, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's DecompressionBombWarning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise DecodeError(TOO_LARGE, f"the image is too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise DecodeError(NOT_AN_IMAGE, f"not a recognised image format ({len(data)} bytes, starts with "
                                        f"{data[:8]!r})") from None
    except Exception as err:  # noqa: BLE001 - any header parse failure is a corrupt file
        raise DecodeError(CORRUPT, f"the image header is damaged: {err}") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DecodeError(TOO_LARGE, f"{width}×{height} = {width * height:,} pixels exceeds the limit of "
                                     f"{MAX_IMAGE_PIXELS:,} pixels (decompression-bomb guard)")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, ValueError, SyntaxError... for bad data
        raise DecodeError(CORRUPT, f"the {image.format or 'image'} data is damaged and cannot be decoded: "
                                   f"{err}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        high_byte = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(high_byte[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks for this route for palette images with transparency
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
