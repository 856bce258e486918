"""Synthetic labelled images: filled shapes on varied backgrounds, written as JPEGs plus COCO JSON.

The data behind the offline ``shapes`` model and the test fixtures. Every image is drawn from its own
random stream ``(seed, index)``, so a set is reproducible and image ``i`` does not depend on how many
images are written.

An image is ``width x height`` pixels, each side drawn from ``[min_side, max_side]`` (240-720 by default,
so aspect ratios up to 3:1), and holds 1..``max_objects`` shapes of the classes in `SHAPE_CLASSES`, each
sized 5-40 % of the shorter side (diameter of the circumscribed circle, log-uniform so that small shapes
are common), at a random position and rotation. What users' images vary in, and the model must not see
as another distribution, is drawn per image or per shape:

* backgrounds: flat, gradients, stripes, smooth blobs, checkerboards or fine noise textures, plus noise;
  some images are letterboxed (flat bars on two sides, as padded or pillarboxed photos are);
* shape fills: one solid colour, a gradient or a stripe texture; most shapes contrast strongly with what
  lies under them, some only weakly (`LOW_CONTRAST_*`);
* overlaps and occlusion: a later shape hides what it covers, some shapes are cut by the image border,
  and some images have occluders (bars and blobs that are no object) drawn over the shapes;
* blur, sensor noise and the JPEG quality of the written file.

The annotation of every shape is its *visible* mask (what neither a later shape, an occluder nor the
border hides). A placement that would leave less than `MIN_VISIBLE_FRACTION` of a shape visible is drawn
again, so every annotated object stays recognisable.

Command line::

    python -m jobs.shapes --out DIR --num-images N --seed S [--min-side 240 --max-side 720]

writes ``DIR/images/shapes_SSSSSS.jpg`` and ``DIR/annotations.json`` (COCO instances: ``bbox`` is
``[x, y, w, h]`` of the visible mask in pixels, ``segmentation`` compressed RLE, ``area`` its pixel count;
``file_name`` is the name inside ``DIR/images``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import NamedTuple

import click
import cv2
import numpy as np
import pycocotools.mask as mask_utils
import tqdm

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "hexagon")
# Size of a shape = diameter of its circumscribed circle, as a fraction of the image's shorter side
# (5-40 %), drawn log-uniformly: as many shapes of 5-14 % as of 14-40 %.
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.05, 0.40
DEFAULT_MIN_SIDE, DEFAULT_MAX_SIDE = 240, 720
# Every annotated shape keeps at least this fraction of its own pixels visible (after later shapes,
# occluders and the border); a placement that would hide more of it is drawn again.
MIN_VISIBLE_FRACTION = 0.5
# Attempts to place one shape or occluder before giving up on it (crowded images get fewer).
PLACEMENT_ATTEMPTS = 20
# RGB distance between a shape's colour and the mean colour under it: a shape normally stands out by
# at least MIN_COLOUR_CONTRAST; a low-contrast shape (probability LOW_CONTRAST_PROBABILITY) lies within
# LOW_CONTRAST_RANGE, still visible to a person on most backgrounds.
MIN_COLOUR_CONTRAST = 80.0
LOW_CONTRAST_PROBABILITY = 0.15
LOW_CONTRAST_RANGE = (30.0, 60.0)
STAR_INNER_RADIUS = 0.45  # inner/outer radius of the 5-point star
# Per-image probabilities of the variations listed in the module docstring.
LETTERBOX_PROBABILITY = 0.15
OCCLUDER_PROBABILITY = 0.3
BLUR_PROBABILITY = 0.3
BORDER_CUT_PROBABILITY = 0.2  # per shape: its centre may lie near or past the border
BLUR_SIGMA = (0.5, 2.0)  # Gaussian blur, pixels
JPEG_QUALITY = (40, 95)  # quality of the written JPEG, drawn per image


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Each image side is drawn from ``[min_side, max_side]`` pixels (equal: square)."""

    out: str
    num_images: int
    seed: int = 0
    min_side: int = DEFAULT_MIN_SIDE
    max_side: int = DEFAULT_MAX_SIDE
    max_objects: int = 6

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if not 32 <= self.min_side <= self.max_side:
            raise ValueError(f"sides must satisfy 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")


class SyntheticImage(NamedTuple):
    """One drawn image: ``image`` uint8 [H, W, 3] RGB (before JPEG), ``objects`` as ``(class index into
    SHAPE_CLASSES, visible mask bool [H, W])`` in drawing order, every mask non-empty, and the JPEG quality
    the image is written with."""

    image: np.ndarray
    objects: list[tuple[int, np.ndarray]]
    jpeg_quality: int

    def jpeg_bytes(self) -> bytes:
        ok, encoded = cv2.imencode(".jpg", self.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        assert ok
        return encoded.tobytes()

    def as_written(self) -> np.ndarray:
        """The image as a reader of the JPEG file sees it: uint8 [H, W, 3] RGB."""
        decoded = cv2.imdecode(np.frombuffer(self.jpeg_bytes(), np.uint8), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(decoded[..., ::-1])


def _polygon(shape: str, centre: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Vertices [V, 2] float (x, y) of ``shape`` with circumscribed radius ``radius``, rotated by ``angle``."""
    if shape == "circle":
        n, radii = 64, np.ones(64)
    elif shape == "square":
        n, radii = 4, np.ones(4)
    elif shape == "triangle":
        n, radii = 3, np.ones(3)
    elif shape == "hexagon":
        n, radii = 6, np.ones(6)
    elif shape == "star":
        n, radii = 10, np.tile([1.0, STAR_INNER_RADIUS], 5)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    theta = angle + np.arange(n) * 2 * math.pi / n
    return centre + radius * radii[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)


def _pattern(rng: np.random.Generator, height: int, width: int, kind: int) -> np.ndarray:
    """A zero-mean texture float32 [height, width] in about -1..1 (kind 0: none)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    along = np.cos(direction) * xx + np.sin(direction) * yy
    if kind == 0:
        return np.zeros((height, width), np.float32)
    if kind == 1:  # linear gradient
        return (along - along.mean()) / max(float(np.ptp(along)), 1e-6) * 2
    if kind == 2:  # stripes
        return np.sin(along * 2 * math.pi / rng.uniform(4, 40))
    if kind == 3:  # smooth blobs: upsampled random noise
        cells = int(rng.integers(3, 10))
        return cv2.resize(rng.uniform(-1, 1, (cells, cells)).astype(np.float32), (width, height),
                          interpolation=cv2.INTER_CUBIC)
    if kind == 4:  # checkerboard
        period = rng.uniform(8, 48)
        across = -np.sin(direction) * xx + np.cos(direction) * yy
        return np.where((np.floor(along / period) + np.floor(across / period)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    # fine noise texture: noise blurred at a small scale
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), rng.uniform(0.7, 2.5)) * 3, -1, 1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A flat, gradient, striped, blobby, checkered or noise-textured background, float32 [H, W, 3] 0..255."""
    kind = int(rng.integers(6))
    base = rng.uniform(0, 255, 3)
    amplitude = rng.uniform(60, 120, 3) if kind == 1 else rng.uniform(10, 50, 3)
    image = base + _pattern(rng, height, width, kind)[..., None] * amplitude
    image = image + rng.normal(0, rng.uniform(2, 15), (height, width, 3))
    return np.clip(image, 0, 255).astype(np.float32)


def _content_box(rng: np.random.Generator, height: int, width: int, image: np.ndarray) -> tuple[int, int, int, int]:
    """Letterbox some images (flat bars on two opposite sides); returns the content box x0, y0, x1, y1."""
    if rng.random() >= LETTERBOX_PROBABILITY:
        return 0, 0, width, height
    colour = rng.choice([0.0, 255.0, rng.uniform(0, 255)])
    if rng.random() < 0.5:
        bar = int(rng.uniform(0.05, 0.2) * height)
        image[:bar], image[height - bar:] = colour, colour
        return 0, bar, width, height - bar
    bar = int(rng.uniform(0.05, 0.2) * width)
    image[:, :bar], image[:, width - bar:] = colour, colour
    return bar, 0, width - bar, height


def _fill(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Paint ``mask`` with a colour that contrasts with what lies under it, solid or textured."""
    under = image[mask].mean(axis=0)
    low, high = (LOW_CONTRAST_RANGE if rng.random() < LOW_CONTRAST_PROBABILITY else (MIN_COLOUR_CONTRAST, np.inf))
    for _attempt in range(100):
        colour = rng.uniform(0, 255, 3)
        if low <= np.linalg.norm(colour - under) <= high:
            break
    kind = int(rng.choice([0, 1, 2], p=[0.6, 0.2, 0.2]))
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    texture = _pattern(rng, y1 - y0, x1 - x0, kind)[..., None] * rng.uniform(10, 35)
    patch = np.clip(colour + texture, 0, 255)
    local = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][local] = patch[local]


def _occluder(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A bar or an irregular blob that is no object, as a bool mask [H, W]."""
    mask = np.zeros((height, width), np.uint8)
    side = min(height, width)
    if rng.random() < 0.5:
        start = rng.uniform(0, [width, height])
        end = start + rng.uniform(0.3, 0.9) * side * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])
        cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1,
                 thickness=max(2, int(rng.uniform(0.02, 0.08) * side)))
    else:
        centre = rng.uniform(0, [width, height])
        count = int(rng.integers(5, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, count))
        radii = rng.uniform(0.03, 0.12) * side * rng.uniform(0.5, 1.0, count)
        vertices = centre + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(vertices).astype(np.int32)], 1)
    return mask.astype(bool)


def _hides_too_much(objects: list[tuple[int, np.ndarray, int]], cover: np.ndarray) -> bool:
    """Whether painting ``cover`` would leave an object with less than MIN_VISIBLE_FRACTION of its own pixels."""
    return any(((visible & ~cover).sum() < MIN_VISIBLE_FRACTION * full) for _, visible, full in objects)


def draw_image(seed: int, index: int, sides: tuple[int, int] = (DEFAULT_MIN_SIDE, DEFAULT_MAX_SIDE),
               max_objects: int = 6) -> SyntheticImage:
    """Draw image ``index`` of the set ``seed``, each side in ``sides`` = (min, max) pixels."""
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    image = _background(rng, height, width)
    x0, y0, x1, y1 = _content_box(rng, height, width, image)
    side = min(x1 - x0, y1 - y0)
    # (class, visible mask, pixels of the whole shape inside the image)
    objects: list[tuple[int, np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            class_id = int(rng.integers(len(SHAPE_CLASSES)))
            radius = math.exp(rng.uniform(math.log(MIN_SIZE_FRACTION), math.log(MAX_SIZE_FRACTION))) * side / 2
            # A cut shape's centre may lie up to half its radius outside the content box.
            margin = -0.5 * radius if rng.random() < BORDER_CUT_PROBABILITY else radius
            low = np.array([x0 + margin, y0 + margin])
            high = np.maximum(np.array([x1 - margin, y1 - margin]), low + 1)
            centre = rng.uniform(low, high)
            vertices = _polygon(SHAPE_CLASSES[class_id], centre, radius, rng.uniform(0, 2 * math.pi))
            mask = np.zeros((height, width), np.uint8)
            cv2.fillPoly(mask, [np.round(vertices).astype(np.int32)], 1)
            mask[:y0], mask[y1:], mask[:, :x0], mask[:, x1:] = 0, 0, 0, 0
            mask = mask.astype(bool)
            full = np.zeros((height + 2 * side, width + 2 * side), np.uint8)  # the shape without the border cut
            cv2.fillPoly(full, [np.round(vertices + side).astype(np.int32)], 1)
            if mask.sum() < MIN_VISIBLE_FRACTION * full.sum() or _hides_too_much(objects, mask):
                continue
            _fill(rng, image, mask)
            objects = [(c, visible & ~mask, n) for c, visible, n in objects]
            objects.append((class_id, mask, int(mask.sum())))
            break
    if rng.random() < OCCLUDER_PROBABILITY:
        for _ in range(int(rng.integers(1, 3))):
            for _attempt in range(PLACEMENT_ATTEMPTS):
                cover = _occluder(rng, height, width)
                if cover.any() and not _hides_too_much(objects, cover):
                    _fill(rng, image, cover)
                    objects = [(c, visible & ~cover, n) for c, visible, n in objects]
                    break
    image = image + rng.normal(0, rng.uniform(0, 6), image.shape)
    if rng.random() < BLUR_PROBABILITY:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*BLUR_SIGMA))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return SyntheticImage(pixels, [(c, m) for c, m, _ in objects if m.any()], quality)


def coco_categories() -> list[dict]:
    """COCO ``categories`` of the shape classes, ids 1..5 in `SHAPE_CLASSES` order."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]


def generate(config: ShapesConfig) -> pathlib.Path:
    """Write the set described by ``config``; return the path of its ``annotations.json``."""
    out = pathlib.Path(config.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in tqdm.trange(config.num_images, desc="shapes", unit="img"):
        drawn = draw_image(config.seed, index, (config.min_side, config.max_side), config.max_objects)
        file_name = f"shapes_{index:06d}.jpg"
        (image_dir / file_name).write_bytes(drawn.jpeg_bytes())
        image_id = index + 1
        height, width = drawn.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for class_id, mask in drawn.objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": class_id + 1,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(mask_utils.area(rle)),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"ovsam-batch synthetic shapes, seed {config.seed}, sides {config.min_side}-{config.max_side} px"},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


@click.command("shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--num-images", required=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the set.")
@click.option("--min-side", default=DEFAULT_MIN_SIDE, show_default=True, type=click.IntRange(min=32),
              help="Smallest image side in pixels (width and height are each drawn from min..max).")
@click.option("--max-side", default=DEFAULT_MAX_SIDE, show_default=True, type=click.IntRange(min=32),
              help="Largest image side in pixels; equal to --min-side for square images.")
@click.option("--max-objects", default=6, show_default=True, type=click.IntRange(min=1), help="Shapes per image, at most.")
def main(out: str, num_images: int, seed: int, min_side: int, max_side: int, max_objects: int) -> None:
    """Generate synthetic shapes images with COCO instance annotations.

    \b
    Example:
      python -m jobs.shapes --out /tmp/shapes --num-images 100 --seed 7
    """
    try:
        config = ShapesConfig(out=out, num_images=num_images, seed=seed, min_side=min_side, max_side=max_side,
                              max_objects=max_objects)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    path = generate(config)
    click.echo(f"wrote {num_images} images and {path}")


if __name__ == "__main__":
    main()
