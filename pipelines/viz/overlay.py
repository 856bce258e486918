"""Draw predicted masks over their image: a colour per mask, its outline, and its label and score.

Everything is deterministic: the same image and annotations give the same pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageDraw, ImageFont

# Distinct colours (Kelly's list of maximum contrast, without white, black and greys, plus a few of
# Glasbey's), RGB. Masks of one image take them in annotation-id order, so neighbours differ.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (255, 99, 71),
)
# Opacity of the mask fill: the image stays visible under it.
FILL_ALPHA = 0.45
OUTLINE_PX = 2
# Longer image side of a drawn overlay; bigger images are scaled down first so that text stays legible
# and files stay small (the labels are drawn at display size, not shrunk with the image).
DISPLAY_MAX_SIDE = 1280
# Label text height as a fraction of the shorter image side, clamped to a legible range in pixels.
TEXT_HEIGHT_FRACTION = 1 / 28
MIN_TEXT_PX, MAX_TEXT_PX = 11, 24
LABEL_BACKGROUND = (0, 0, 0, 185)  # RGBA behind the label text
LABEL_TEXT = (255, 255, 255, 255)
MISSING_IMAGE_GREY = 96  # canvas of an overlay whose source image cannot be read
# The text font (see `font`): package, file, and the face in that OpenType collection (0: Noto Sans CJK JP;
# the collection's faces differ only in the regional forms of some Han characters).
_FONT_PACKAGE, _FONT_FILE, _FONT_INDEX = "noto_cjk_sans_otc", "NotoSansCJK-Regular.ttc", 0


@dataclasses.dataclass(frozen=True)
class DrawnObject:
    """One annotation to draw. ``mask`` is bool [H, W] in the image frame; ``bbox`` is x, y, w, h pixels."""

    mask: np.ndarray
    bbox: tuple[float, float, float, float]
    label: str
    score: float


def decode_rle(segmentation: dict) -> np.ndarray:
    """COCO compressed RLE ``{"size": [h, w], "counts": str}`` (as in the annotations table) -> bool [h, w]."""
    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def display_shape(height: int, width: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(height, width) of an image drawn with its longer side at most ``max_side`` (aspect kept)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def scaled(obj: DrawnObject, shape: tuple[int, int]) -> DrawnObject:
    """``obj`` with its mask resized (nearest) to ``shape`` (height, width) and its box scaled to match."""
    if obj.mask.shape == shape:
        return obj
    sy, sx = shape[0] / obj.mask.shape[0], shape[1] / obj.mask.shape[1]
    mask = cv2.resize(obj.mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    x, y, w, h = obj.bbox
    return dataclasses.replace(obj, mask=mask.astype(bool), bbox=(x * sx, y * sy, w * sx, h * sy))


def objects_from_rows(rows: Sequence[dict], shape: tuple[int, int] | None = None) -> list[DrawnObject]:
    """`DrawnObject`s from annotations-table rows (dicts with segmentation, bbox, label, score).

    With ``shape`` (see `display_shape`), each mask is scaled to it as soon as it is decoded, so a large
    image with many masks never holds them all at full size.
    """
    objects = []
    for row in rows:
        obj = DrawnObject(mask=decode_rle(row["segmentation"]), bbox=tuple(row["bbox"]), label=row["label"],
                          score=row["score"])
        objects.append(scaled(obj, shape) if shape else obj)
    return objects


@functools.lru_cache(maxsize=16)
def font(height_px: int) -> ImageFont.FreeTypeFont:
    """The text font at ``height_px``: Noto Sans CJK from the ``noto-cjk-sans-otc`` package (no system fonts
    needed), which draws Latin, Greek and Cyrillic as well as Chinese, Japanese and Korean labels (Pillow's own
    font has Latin only: other labels came out as empty boxes)."""
    return ImageFont.truetype(str(importlib.resources.files(_FONT_PACKAGE) / _FONT_FILE), height_px,
                              index=_FONT_INDEX)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(
    bbox: tuple[float, float, float, float], size: tuple[int, int], image_size: tuple[int, int],
    taken: list[tuple[int, int, int, int]],
) -> tuple[int, int]:
    """Top-left corner of a label of ``size`` (w, h): inside the box's top-left corner if free, else above
    the box, else below it, else further down (wrapping to the top) in the box's column; always inside the
    image. Only when the whole column is taken does it overlap another label."""
    x, y, w, h = bbox
    label_w, label_h = size
    image_w, image_h = image_size
    rows = max(1, image_h // max(label_h, 1))
    candidates = [(x, y), (x, y - label_h), (x, y + h)]
    candidates += [(x, (y + k * label_h) % (rows * label_h)) for k in range(1, rows)]

    def clamp(point: tuple[float, float]) -> tuple[int, int]:
        px = int(min(max(point[0], 0), max(image_w - label_w, 0)))
        py = int(min(max(point[1], 0), max(image_h - label_h, 0)))
        return px, py

    for point in candidates:
        px, py = clamp(point)
        if not any(_overlaps((px, py, px + label_w, py + label_h), t) for t in taken):
            return px, py
    return clamp(candidates[0])


def contrasting_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """The `PALETTE` colour farthest (RGB distance) from the mean colour of ``rgb`` (uint8 [..., 3]):
    for drawing a single mask that must stand out from its surroundings."""
    mean = rgb.reshape(-1, 3).mean(axis=0)
    return max(PALETTE, key=lambda colour: float(np.linalg.norm(np.asarray(colour) - mean)))


def render_overlay(
    rgb: np.ndarray, objects: Sequence[DrawnObject], max_side: int = DISPLAY_MAX_SIDE, draw_text: bool = True,
    colours: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """The image with each object's mask filled in its own colour, outlined, and labelled "label 0.93".

    ``rgb``: uint8 [H, W, 3]. ``objects`` in the order that picks their colours (PALETTE, cycling),
    unless ``colours`` gives one per object. Larger masks are painted first so smaller ones stay
    visible on top. The result is scaled so its longer side is at most ``max_side``.
    """
    shape = display_shape(*rgb.shape[:2], max_side)
    if shape != rgb.shape[:2]:
        rgb = np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0]), Image.Resampling.LANCZOS))
    objects = [scaled(obj, shape) for obj in objects]
    canvas = rgb.astype(np.float32)
    if colours is None:
        colours = [PALETTE[i % len(PALETTE)] for i in range(len(objects))]
    order = sorted(range(len(objects)), key=lambda i: -int(objects[i].mask.sum()))
    for i in order:
        mask = objects[i].mask
        canvas[mask] = (1 - FILL_ALPHA) * canvas[mask] + FILL_ALPHA * np.asarray(colours[i], np.float32)
    out = np.ascontiguousarray(np.round(canvas).astype(np.uint8))
    for i in order:
        contours, _ = cv2.findContours(objects[i].mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colours[i], thickness=OUTLINE_PX, lineType=cv2.LINE_8)
    image = Image.fromarray(out)
    if draw_text and objects:
        _draw_labels(image, objects, colours)
    return image


def _draw_labels(image: Image.Image, objects: Sequence[DrawnObject], colours: Sequence[tuple[int, int, int]]) -> None:
    """Label and score of each object on a dark box with a swatch of its colour, smallest objects first
    (they get the best spots: their box is where the eye looks for them)."""
    text_px = int(np.clip(round(min(image.size) * TEXT_HEIGHT_FRACTION), MIN_TEXT_PX, MAX_TEXT_PX))
    face = font(text_px)
    pad = max(2, text_px // 5)
    swatch = max(6, text_px - pad)  # square of the mask's colour, left of the text
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    taken: list[tuple[int, int, int, int]] = []
    for i in sorted(range(len(objects)), key=lambda i: int(objects[i].mask.sum())):
        empty = objects[i].bbox[2] <= 0 or objects[i].bbox[3] <= 0  # the table's box of an empty mask is zeros
        text = f"{objects[i].label} {objects[i].score:.2f}" + (" (empty mask)" if empty else "")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
        size = (swatch + 3 * pad + right - left, max(bottom - top, swatch) + 2 * pad)
        x, y = _place_label(objects[i].bbox, size, image.size, taken)
        taken.append((x, y, x + size[0], y + size[1]))
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=LABEL_BACKGROUND)
        sy = y + (size[1] - swatch) // 2
        draw.rectangle((x + pad, sy, x + pad + swatch - 1, sy + swatch - 1), fill=(*colours[i], 255))
        draw.text((x + 2 * pad + swatch - left, y + pad - top), text, font=face, fill=LABEL_TEXT)
    image.paste(Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB"))


def render_missing_image(height: int, width: int, objects: Sequence[DrawnObject], reason: str) -> Image.Image:
    """The overlay on a grey canvas of the image's size, for when the source image cannot be read
    (moved, deleted, unreachable): the masks still show, with ``reason`` written at the bottom."""
    grey = np.full((*display_shape(height, width), 3), MISSING_IMAGE_GREY, np.uint8)
    image = render_overlay(grey, objects)
    draw = ImageDraw.Draw(image)
    text_px = int(np.clip(round(min(image.size) * TEXT_HEIGHT_FRACTION), MIN_TEXT_PX, MAX_TEXT_PX))
    face = font(text_px)
    while len(reason) > 4 and draw.textlength(reason, font=face) > image.size[0] - 8:
        reason = reason[: len(reason) * 9 // 10 - 1] + "…"
    draw.text((4, image.size[1] - text_px - 6), reason, font=face, fill=(255, 255, 255))
    return image
