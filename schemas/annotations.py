"""Columnar builder of the ``annotations`` table: one model prediction for one image → Arrow rows.

`AnnotationColumns` maps one-to-one onto `ANNOTATIONS_SCHEMA`. It is built from anything shaped like
``ovsam.Prediction`` (duck-typed: ``schemas`` depends on nothing of ours): the prediction gives COCO's
uncompressed run lengths of its masks (computed where the masks are, on the model's device), pycocotools
compresses them, and ``bbox`` and ``area`` come from the compressed RLE, so all three agree with what
pycocotools computes when the table is read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils

from schemas.tables import ANNOTATIONS_SCHEMA, validate

# annotation_id = (41 bits of a hash of the image URI) << 12 | (index of the object in the image).
# 53 bits keep the id exact in a float64, so JavaScript-based tools (CVAT, Label Studio, browsers reading
# COCO JSON) read it unchanged: ids stay <= 2^53 - 1 (`MAX_SAFE_ID`). 12 index bits allow 4096 objects per
# image (automatic mode's default 32×32 grid yields at most 1024). The price of 41 hash bits: two images
# share a hash with probability about n² / 2^42 (1 in 440 for 100,000 images, 1 in 4 for a million).
ANNOTATION_INDEX_BITS = 12
MAX_ANNOTATIONS_PER_IMAGE = 1 << ANNOTATION_INDEX_BITS
MAX_SAFE_ID = (1 << 53) - 1  # JavaScript's Number.MAX_SAFE_INTEGER
_URI_HASH_BITS = 53 - ANNOTATION_INDEX_BITS


class TooManyAnnotationsError(ValueError):
    """An image produced more objects than an annotation id can number (`MAX_ANNOTATIONS_PER_IMAGE`)."""


class PredictionLike(Protocol):
    """The fields of ``ovsam.Prediction`` this module reads (N objects, original-image frame)."""

    image_size: tuple[int, int]  # (H, W) of the original image
    label_ids: np.ndarray  # [N] int64, index into the vocabulary
    scores: np.ndarray  # [N] float32
    topk_ids: np.ndarray  # [N, k] int64
    topk_probs: np.ndarray  # [N, k] float32
    prompt_type: str  # "box" | "point" | "grid"
    prompts: np.ndarray  # [N, 4] xyxy boxes or [N, 2] xy points, float32

    def __len__(self) -> int: ...  # N

    def run_lengths(self) -> list[np.ndarray]: ...  # N uint32 arrays, see `compress_run_lengths`


def annotation_id(image_uri: str, index: int) -> int:
    """Stable id of object ``index`` (0-based, < `MAX_ANNOTATIONS_PER_IMAGE`) of the image at ``image_uri``."""
    if not 0 <= index < MAX_ANNOTATIONS_PER_IMAGE:
        raise TooManyAnnotationsError(
            f"object index {index} is outside 0..{MAX_ANNOTATIONS_PER_IMAGE - 1}: an image may hold at most "
            f"{MAX_ANNOTATIONS_PER_IMAGE} annotations")
    digest = int.from_bytes(hashlib.blake2b(image_uri.encode(), digest_size=8).digest(), "big")
    return ((digest >> (64 - _URI_HASH_BITS)) << ANNOTATION_INDEX_BITS) | index


def compress_run_lengths(run_lengths: Sequence[np.ndarray], height: int, width: int) -> list[dict]:
    """COCO compressed RLE of masks given as uncompressed run lengths.

    run_lengths: per mask, uint32 lengths of alternating runs of 0 and 1 in column-major order, starting
    with a run of 0 (of length 0 if the first pixel is set), summing to ``height * width``.
    Returns pycocotools' dicts ``{"size": [H, W], "counts": bytes}``, the same as ``pycocotools.mask.encode``.
    """
    if len(run_lengths) == 0:
        return []
    return mask_utils.frPyObjects([{"size": [height, width], "counts": runs} for runs in run_lengths],
                                  height, width)


def decode_rle(rle: dict) -> np.ndarray:
    """Decode one mask of `compress_run_lengths`: ``{"size": [H, W], "counts": str}`` → [H, W] bool."""
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}).astype(bool)


@dataclasses.dataclass
class AnnotationColumns:
    """The annotations of one or more images as columns, in `ANNOTATIONS_SCHEMA` order and meaning."""

    image_uri: list[str]
    annotation_id: list[int]
    bbox: list[list[float]]  # COCO x, y, width, height of the mask, pixels
    segmentation: list[dict]  # {"size": [H, W], "counts": str}
    area: list[int]  # mask pixel count
    label: list[str]
    label_id: list[int]
    score: list[float]
    topk_labels: list[list[str]]
    topk_label_ids: list[list[int]]
    topk_scores: list[list[float]]
    prompt_type: list[str]
    prompt: list[list[float]]

    @classmethod
    def empty(cls) -> AnnotationColumns:
        return cls(*([] for _ in dataclasses.fields(cls)))

    @classmethod
    def from_prediction(cls, image_uri: str, prediction: PredictionLike,
                        label_names: Sequence[str]) -> AnnotationColumns:
        """Rows for the N objects of ``prediction`` on the image at ``image_uri``; ``label_names[i]`` names id i.

        Raises `TooManyAnnotationsError` when N exceeds `MAX_ANNOTATIONS_PER_IMAGE`.
        """
        count = len(prediction)
        if count > MAX_ANNOTATIONS_PER_IMAGE:
            raise TooManyAnnotationsError(
                f"{count} objects in one image; at most {MAX_ANNOTATIONS_PER_IMAGE} can be numbered")
        if count == 0:
            return cls.empty()
        height, width = prediction.image_size
        coded = compress_run_lengths(prediction.run_lengths(), height, width)
        bboxes = mask_utils.toBbox(coded).tolist()
        areas = mask_utils.area(coded).tolist()
        label_ids = np.asarray(prediction.label_ids, dtype=np.int64).tolist()
        topk_ids = np.asarray(prediction.topk_ids, dtype=np.int64).reshape(count, -1).tolist()
        return cls(
            image_uri=[image_uri] * count,
            annotation_id=[annotation_id(image_uri, i) for i in range(count)],
            bbox=bboxes,
            segmentation=[{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in coded],
            area=[int(a) for a in areas],
            label=[label_names[i] for i in label_ids],
            label_id=label_ids,
            score=np.asarray(prediction.scores, dtype=np.float32).tolist(),
            topk_labels=[[label_names[i] for i in row] for row in topk_ids],
            topk_label_ids=topk_ids,
            topk_scores=np.asarray(prediction.topk_probs, dtype=np.float32).reshape(count, -1).tolist(),
            prompt_type=[prediction.prompt_type] * count,
            prompt=np.asarray(prediction.prompts, dtype=np.float32).reshape(count, -1).tolist(),
        )

    def extend(self, other: AnnotationColumns) -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).extend(getattr(other, field.name))

    def __len__(self) -> int:
        return len(self.image_uri)

    def to_table(self) -> pa.Table:
        """The rows as a table validated against (and carrying the metadata of) `ANNOTATIONS_SCHEMA`."""
        columns = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return validate(pa.table(columns, schema=ANNOTATIONS_SCHEMA), ANNOTATIONS_SCHEMA)
