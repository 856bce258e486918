"""Synthetic labelled images: filled shapes on noisy or textured backgrounds, written as JPEGs plus COCO JSON.

The data behind the offline ``shapes`` model and the test fixtures. Every image is drawn from its own
random stream ``(seed, index)``, so a set is reproducible and image ``i`` does not depend on how many
images are written.

Each image holds 1..``max_objects`` shapes of the classes in `SHAPE_CLASSES`, each filled with one random
solid colour, sized 5-40 % of the image side (diameter of the circumscribed circle), at a random
position (wholly inside the image) and rotation. Shapes may overlap: a later shape hides what it covers,
and the annotation of every shape is its *visible* mask. A placement that would hide most of an earlier
shape is drawn again, so every annotated object stays recognisable.

Command line::

    python -m jobs.shapes --out DIR --num-images N --seed S --size 256

writes ``DIR/images/shapes_SSSSSS.jpg`` and ``DIR/annotations.json`` (COCO instances: ``bbox`` is
``[x, y, w, h]`` of the visible mask in pixels, ``segmentation`` compressed RLE, ``area`` its pixel count;
``file_name`` is the name inside ``DIR/images``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import click
import cv2
import numpy as np
import pycocotools.mask as mask_utils
import tqdm

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "hexagon")
# Size of a shape = diameter of its circumscribed circle, as a fraction of the image side (the 5-40 %).
MIN_SIZE_FRACTION, MAX_SIZE_FRACTION = 0.05, 0.40
# A new shape may hide at most this fraction of an earlier shape's visible pixels; otherwise it is redrawn.
MAX_HIDDEN_FRACTION = 0.5
# Attempts to place one shape before giving up on it (crowded images simply get fewer shapes).
PLACEMENT_ATTEMPTS = 20
# Minimum RGB distance between a shape's colour and the mean background colour under it, so that a
# shape is visible to a person; below it the colour is drawn again.
MIN_COLOUR_CONTRAST = 80.0
STAR_INNER_RADIUS = 0.45  # inner/outer radius of the 5-point star
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What to generate. ``size`` is the side of the square images in pixels."""

    out: str
    num_images: int
    seed: int = 0
    size: int = 256
    max_objects: int = 6

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")


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


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A noisy or textured background, float32 [size, size, 3] in 0..255."""
    kind = rng.integers(4)
    base = rng.uniform(0, 255, 3)
    if kind == 0:  # flat colour
        image = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient between two colours
        other = rng.uniform(0, 255, 3)
        direction = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        t = (np.cos(direction) * xx + np.sin(direction) * yy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        image = base + t[..., None] * (other - base)
    elif kind == 2:  # stripes
        period = rng.uniform(6, 40)
        direction = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin((np.cos(direction) * xx + np.sin(direction) * yy) * 2 * math.pi / period)
        image = base + wave[..., None] * rng.uniform(10, 40, 3)
    else:  # smooth blobs: upsampled random noise
        cells = int(rng.integers(3, 10))
        coarse = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
        blobs = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        image = base + blobs * rng.uniform(15, 50)
    image = image + rng.normal(0, rng.uniform(3, 20), (size, size, 3))
    return np.clip(image, 0, 255).astype(np.float32)


def draw_image(seed: int, index: int, size: int, max_objects: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw image ``index`` of the set ``seed``.

    Returns the image (uint8 [size, size, 3] RGB) and its objects as ``(class index into SHAPE_CLASSES,
    visible mask bool [size, size])``, in drawing order; every mask is non-empty.
    """
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    objects: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            class_id = int(rng.integers(len(SHAPE_CLASSES)))
            radius = rng.uniform(MIN_SIZE_FRACTION, MAX_SIZE_FRACTION) * size / 2
            centre = rng.uniform(radius, size - radius, 2)
            vertices = _polygon(SHAPE_CLASSES[class_id], centre, radius, rng.uniform(0, 2 * math.pi))
            mask = np.zeros((size, size), np.uint8)
            cv2.fillPoly(mask, [np.round(vertices).astype(np.int32)], 1)
            mask = mask.astype(bool)
            if not mask.any():
                continue
            hides_too_much = any(
                (previous & mask).sum() > MAX_HIDDEN_FRACTION * previous.sum() for _, previous in objects
            )
            if hides_too_much:
                continue
            under = image[mask].mean(axis=0)
            colour = rng.uniform(0, 255, 3)
            while np.linalg.norm(colour - under) < MIN_COLOUR_CONTRAST:
                colour = rng.uniform(0, 255, 3)
            image[mask] = colour
            objects = [(c, previous & ~mask) for c, previous in objects]
            objects.append((class_id, mask))
            break
    return np.round(image).astype(np.uint8), [(c, m) for c, m in objects if m.any()]


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
        image, objects = draw_image(config.seed, index, config.size, config.max_objects)
        file_name = f"shapes_{index:06d}.jpg"
        cv2.imwrite(str(image_dir / file_name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": config.size, "height": config.size})
        for class_id, mask in objects:
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
        "info": {"description": f"ovsam-batch synthetic shapes, seed {config.seed}, {config.size}px"},
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
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=32), help="Image side in pixels.")
@click.option("--max-objects", default=6, show_default=True, type=click.IntRange(min=1), help="Shapes per image, at most.")
def main(out: str, num_images: int, seed: int, size: int, max_objects: int) -> None:
    """Generate synthetic shapes images with COCO instance annotations."""
    path = generate(ShapesConfig(out=out, num_images=num_images, seed=seed, size=size, max_objects=max_objects))
    click.echo(f"wrote {num_images} images and {path}")


if __name__ == "__main__":
    main()
