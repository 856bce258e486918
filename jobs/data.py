"""Training data of the two jobs, read from local paths or object storage through fsspec.

* SA-1B layout (SAM2CLIP): a folder or prefix of images (`ovsam.images.IMAGE_SUFFIXES`), each optionally
  beside a ``*.json`` of the same stem (SA-1B's per-image annotations; distillation needs only the image).
  Teacher embeddings live under their own prefix, one ``<relative image path>.npy`` per image (see
  `embedding_uri`).
* COCO instances (CLIP2SAM): an instances JSON (COCO, LVIS or a user's own) and the folder its
  ``file_name``s are relative to.

Images are decoded by the labeller's decoder (`ovsam.images.decode_image`), then preprocessed exactly as for
inference (`ovsam.transforms.preprocess`), so the model trains on the input it will see.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import cv2
import fsspec
import numpy as np
import pycocotools.mask as mask_utils
import torch

from ovsam.images import IMAGE_SUFFIXES, DecodeError, decode_image
from ovsam.redaction import redact_uri
from ovsam.transforms import ImageFrame, preprocess
from pipelines.storage import publish_bytes

EMBEDDING_SUFFIX = ".npy"
# Ground-truth masks smaller than this (pixels in the model input frame) give no usable point prompt or
# mask target after resizing and are skipped.
MIN_INPUT_MASK_PIXELS = 1


class DataError(ValueError):
    """Training data cannot be read; the message names the file and the reason."""


def join(prefix: str, relative: str) -> str:
    return posixpath.join(prefix.rstrip("/"), relative)


def read_image(uri: str) -> np.ndarray:
    """Decode one image with the labeller's decoder (`ovsam.images.decode_image`): RGB uint8 [H, W, 3],
    EXIF orientation applied, 16-bit range kept. Raises `DataError`."""
    try:
        with fsspec.open(uri, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as err:
        raise DataError(f"image {redact_uri(uri)} does not exist") from err
    try:
        return decode_image(data)
    except DecodeError as err:
        raise DataError(f"image {redact_uri(uri)}: {err}") from err


def list_images(prefix: str) -> list[str]:
    """Relative paths (sorted) of the images under ``prefix``, recursively. Raises `DataError` if none."""
    fs, root = fsspec.core.url_to_fs(prefix)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise DataError(f"image folder {prefix} does not exist")
    relative = sorted(
        path[len(root) + 1:] for path in fs.find(root) if path.lower().endswith(IMAGE_SUFFIXES)
    )
    if not relative:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {prefix}")
    return relative


def embedding_uri(embeddings_prefix: str, relative_image_path: str) -> str:
    """Where the teacher embedding of an image lives: its relative path plus ``.npy`` (``a/b.jpg.npy``)."""
    return join(embeddings_prefix, relative_image_path + EMBEDDING_SUFFIX)


def read_embedding(uri: str) -> np.ndarray:
    """A stored teacher embedding, float16 [C, g, g] (``np.load`` without pickle)."""
    try:
        with fsspec.open(uri, "rb") as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except FileNotFoundError as err:
        raise DataError(f"teacher embedding {uri} does not exist: run `ovsam-batch train precompute-teacher` first") from err
    except ValueError as err:
        raise DataError(f"teacher embedding {uri} is not a readable .npy array: {err}") from err


def write_embedding(uri: str, embedding: np.ndarray) -> None:
    """Publish ``embedding`` at ``uri`` whole or not at all (temp file + rename locally, one PUT on object
    stores), so a killed precompute never leaves a truncated ``.npy`` under the final name."""
    buffer = io.BytesIO()
    np.save(buffer, embedding, allow_pickle=False)
    fs, path = fsspec.core.url_to_fs(uri)
    publish_bytes(fs, path, buffer.getvalue())


def embedding_is_complete(uri: str, shape: tuple[int, ...]) -> bool:
    """Whether ``uri`` holds a whole float16 ``.npy`` of ``shape``: its header says so and the file is as long
    as that header promises (a truncated or foreign file is not, and is embedded again). Reads the header only."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as handle:
            read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(handle) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header_shape, fortran_order, dtype = read_header(handle)
            data_offset = handle.tell()
        size = fs.size(path)
    except (OSError, ValueError, EOFError):  # missing (FileNotFoundError is an OSError), empty or not a .npy
        return False
    expected = data_offset + int(np.prod(shape)) * np.dtype(np.float16).itemsize
    return tuple(header_shape) == tuple(shape) and dtype == np.float16 and not fortran_order and size == expected


class DistillationPairs(torch.utils.data.Dataset):
    """(model input, teacher embedding) pairs for SAM2CLIP.

    Item: ``pixels`` float32 [3, S, S] (preprocessed), ``target`` float32 [C, g, g] (the stored embedding).
    """

    def __init__(self, images_prefix: str, embeddings_prefix: str, relative_paths: list[str], image_size: int) -> None:
        self.images_prefix = images_prefix
        self.embeddings_prefix = embeddings_prefix
        self.relative_paths = relative_paths
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        relative = self.relative_paths[index]
        pixels, _ = preprocess(read_image(join(self.images_prefix, relative)), self.image_size)
        target = read_embedding(embedding_uri(self.embeddings_prefix, relative))
        return {"pixels": pixels, "target": torch.from_numpy(target.astype(np.float32))}


def _random_pixel(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of a pixel of the non-empty bool mask [H, W], uniformly at random."""
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(len(xs)))
    return int(xs[pick]), int(ys[pick])


@dataclass(frozen=True)
class CocoCategories:
    """Dataset categories in id order: ``ids[k]``/``names[k]`` is class ``k`` of the training vocabulary."""

    ids: tuple[int, ...]
    names: tuple[str, ...]


def coco_categories(coco: dict) -> CocoCategories:
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    return CocoCategories(tuple(c["id"] for c in categories), tuple(c["name"] for c in categories))


def load_coco(annotations_uri: str) -> dict:
    """Read a COCO instances JSON (local or URL). Raises `DataError` in plain words."""
    try:
        with fsspec.open(annotations_uri, "r") as handle:
            data = json.load(handle)
    except FileNotFoundError as err:
        raise DataError(f"annotation file {annotations_uri} does not exist") from err
    except json.JSONDecodeError as err:
        raise DataError(f"annotation file {annotations_uri} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise DataError(f"annotation file {annotations_uri} is not COCO instances JSON (needs images, annotations, categories)")
    return data


# Background prompts near objects are drawn within this many input pixels outside an object's border
# (where a point most easily leaks onto the object); the other half anywhere on no object.
BORDER_BAND_PIXELS = 4
BORDER_SHARE = 0.5


class CocoInstances(torch.utils.data.Dataset):
    """Images with their instances, prompts and targets for CLIP2SAM.

    Per item, per epoch and reproducibly: up to ``max_instances`` object prompts, the instances (crowd and
    empty ones left out) in random order; with ``replicate`` (the release's ``use_point_det``), an image
    with fewer instances repeats them up to ``max_instances``, each copy with a point of its own. Then
    ``round(background_points * object prompts)`` background prompts (beyond the release): points on no
    object, half of them within `BORDER_BAND_PIXELS` outside an object's border, whose target is the
    background class and an empty mask. N prompts in all:

    ``pixels`` float32 [3, S, S]; ``boxes`` float32 [N, 4] xyxy input-frame pixels (the ground-truth box;
    zeros for background prompts); ``points`` float32 [N, 2] xy input-frame pixels (a random pixel of the
    instance's mask in the input frame, as the release draws it); ``is_box`` bool [N] (prompt by box, else
    by point: exactly half of the object prompts, never a background prompt); ``is_background`` bool [N];
    ``labels`` int64 [N] (class index in `categories`, ``len(categories)`` for background); ``masks`` uint8
    [N, S, S] (input frame, padded; all zero for background prompts).
    """

    def __init__(self, coco: dict, image_root: str, image_size: int, max_instances: int, seed: int,
                 replicate: bool = False, background_points: float = 0.0) -> None:
        if background_points < 0:
            raise DataError(f"background_points must be at least 0, got {background_points}")
        self.image_root = image_root
        self.image_size = image_size
        self.max_instances = max_instances
        self.seed = seed
        self.replicate = replicate
        self.background_points = background_points
        self.epoch = 0
        self.categories = coco_categories(coco)
        class_of = {cat_id: k for k, cat_id in enumerate(self.categories.ids)}
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            if not ann.get("iscrowd", 0) and ann.get("area", 1) > 0 and ann["category_id"] in class_of:
                by_image.setdefault(ann["image_id"], []).append({**ann, "class": class_of[ann["category_id"]]})
        self.images = [img for img in coco["images"] if img["id"] in by_image]
        self.annotations = by_image
        if not self.images:
            raise DataError("the annotation file has no image with a usable (non-crowd, non-empty) instance")

    def set_epoch(self, epoch: int) -> None:
        """Instance choice and prompt types are drawn afresh each epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        info = self.images[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = read_image(join(self.image_root, info["file_name"]))
        height, width = image.shape[:2]
        pixels, frame = preprocess(image, self.image_size)
        anns = [self.annotations[info["id"]][i] for i in rng.permutation(len(self.annotations[info["id"]]))]
        instances = []
        for ann in anns:
            mask = self._input_mask(ann["segmentation"], height, width, frame)
            if mask.sum() >= MIN_INPUT_MASK_PIXELS:
                x, y, w, h = ann["bbox"]
                instances.append((frame.boxes_to_input(np.array([[x, y, x + w, y + h]]))[0], ann["class"], mask))
        on_object = np.logical_or.reduce([m.astype(bool) for _, _, m in instances]) if instances else None
        if self.replicate and instances:
            instances = instances * (self.max_instances // len(instances) + 1)
        instances = instances[: self.max_instances]
        n = len(instances)
        boxes = np.array([box for box, _, _ in instances], np.float32).reshape(n, 4)
        labels = [label for _, label, _ in instances]
        masks = [mask for _, _, mask in instances]
        points = [_random_pixel(rng, mask.astype(bool)) for mask in masks]
        is_box = np.zeros(n, bool)
        is_box[rng.permutation(n)[: (n + int(rng.integers(2))) // 2]] = True  # half, the odd one either way
        background = self._background_points(rng, frame, on_object, round(self.background_points * n)) if n else []
        size, k = self.image_size, len(background)
        return {
            "pixels": pixels,
            "boxes": torch.from_numpy(np.concatenate([boxes, np.zeros((k, 4), np.float32)])),
            "points": torch.tensor(points + background, dtype=torch.float32).reshape(n + k, 2),
            "is_box": torch.from_numpy(np.concatenate([is_box, np.zeros(k, bool)])),
            "is_background": torch.from_numpy(np.arange(n + k) >= n),
            "labels": torch.tensor(labels + [len(self.categories.ids)] * k, dtype=torch.int64),
            "masks": torch.from_numpy(np.array(masks + [np.zeros((size, size), np.uint8)] * k, np.uint8).reshape(n + k, size, size)),
        }

    def _background_points(self, rng: np.random.Generator, frame: ImageFrame, on_object: np.ndarray,
                           count: int) -> list[tuple[int, int]]:
        """``count`` points (x, y) on no object inside the image (not its padding), half near borders."""
        if count == 0:
            return []
        rh, rw = frame.resized_size
        free = np.zeros_like(on_object)
        free[:rh, :rw] = ~on_object[:rh, :rw]
        kernel = np.ones((2 * BORDER_BAND_PIXELS + 1,) * 2, np.uint8)
        near = cv2.dilate(on_object.astype(np.uint8), kernel).astype(bool) & free
        near_count = int(rng.binomial(count, BORDER_SHARE)) if near.any() else 0
        return ([_random_pixel(rng, near) for _ in range(near_count)]
                + [_random_pixel(rng, free) for _ in range(count - near_count) if free.any()])

    def _input_mask(self, segmentation, height: int, width: int, frame: ImageFrame) -> np.ndarray:
        """The instance mask resized into the input frame (nearest) and zero-padded: uint8 [S, S]."""
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")
                   if isinstance(segmentation["counts"], str) else segmentation["counts"]}
        mask = mask_utils.decode(rle)
        rh, rw = frame.resized_size
        resized = cv2.resize(mask, (rw, rh), interpolation=cv2.INTER_NEAREST)
        out = np.zeros((self.image_size, self.image_size), np.uint8)
        out[:rh, :rw] = resized
        return out


def collate_instances(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack images and concatenate instances; ``image_index`` [N] int64 says which image each belongs to."""
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "image_index": torch.cat([torch.full((len(item["labels"]),), i, dtype=torch.int64) for i, item in enumerate(items)]),
        **{key: torch.cat([item[key] for item in items])
           for key in ("boxes", "points", "is_box", "is_background", "labels", "masks")},
    }
