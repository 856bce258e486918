"""The label-table contract: RLE round trip, annotation ids, schema validation, COCO export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO

from ovsam.transforms import mask_run_lengths
from schemas.annotations import (
    MAX_ANNOTATIONS_PER_IMAGE,
    MAX_SAFE_ID,
    AnnotationColumns,
    TooManyAnnotationsError,
    annotation_id,
    compress_run_lengths,
    decode_rle,
)
from schemas.coco import write_coco
from schemas.tables import ANNOTATIONS_SCHEMA, IMAGES_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, SchemaError, validate

LABELS = ("cat", "dog", "bird")


@dataclasses.dataclass
class Prediction:
    """What the tables are built from, as ``ovsam.Prediction`` gives it (schemas does not import ovsam),
    from full-resolution masks kept here to check the rows against."""

    masks: np.ndarray
    label_ids: np.ndarray
    scores: np.ndarray
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    prompt_type: str
    prompts: np.ndarray

    @property
    def image_size(self) -> tuple[int, int]:
        return self.masks.shape[1:]

    def __len__(self) -> int:
        return len(self.masks)

    def run_lengths(self) -> list[np.ndarray]:
        return mask_run_lengths(torch.from_numpy(self.masks))


def random_prediction(seed: int, height: int, width: int, count: int) -> Prediction:
    rng = np.random.default_rng(seed)
    masks = rng.random((count, height, width)) < 0.3
    if count >= 2:
        masks[0] = False  # an empty mask
        masks[1] = True  # a full mask
    topk = np.stack([rng.permutation(len(LABELS))[:2] for _ in range(count)]).reshape(count, 2)
    return Prediction(masks=masks, label_ids=topk[:, 0].astype(np.int64), scores=rng.random(count).astype(np.float32),
                      topk_ids=topk.astype(np.int64), topk_probs=rng.random((count, 2)).astype(np.float32),
                      prompt_type="box", prompts=rng.random((count, 4)).astype(np.float32) * 10)


def test_run_lengths_compress_to_exactly_what_pycocotools_encodes():
    """Odd sizes, empty and full masks, masks starting with a set pixel, a single pixel, one row."""
    for seed, (height, width) in enumerate([(37, 53), (1, 9), (8, 1), (64, 48)]):
        prediction = random_prediction(seed, height, width, 6)
        prediction.masks[2] = False
        prediction.masks[2, 0, 0] = True  # starts with a 1-run
        prediction.masks[3] = False
        prediction.masks[3, -1, -1] = True  # ends with a 1-run
        runs = prediction.run_lengths()
        assert all(r.dtype == np.uint32 and r.sum() == height * width for r in runs)
        ours = compress_run_lengths(runs, height, width)
        expected = mask_utils.encode(np.asfortranarray(np.moveaxis(prediction.masks.astype(np.uint8), 0, -1)))
        assert [r["counts"] for r in ours] == [r["counts"] for r in expected]
        assert all(list(r["size"]) == [height, width] for r in ours)
        for mask, rle in zip(prediction.masks, ours):
            np.testing.assert_array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].decode()}), mask)
    assert compress_run_lengths([], 4, 4) == []


def test_columns_from_prediction_match_pycocotools_and_the_schema():
    prediction = random_prediction(1, 30, 40, 4)
    columns = AnnotationColumns.from_prediction("s3://bucket/a.jpg", prediction, LABELS)
    table = columns.to_table()
    assert table.schema.equals(ANNOTATIONS_SCHEMA, check_metadata=True)
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()
    rows = table.to_pylist()
    assert len(rows) == 4
    for row, mask, label_id, topk in zip(rows, prediction.masks, prediction.label_ids, prediction.topk_ids):
        decoded = decode_rle(row["segmentation"])
        np.testing.assert_array_equal(decoded, mask)
        assert row["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        expected_bbox = [0, 0, 0, 0] if not mask.any() else [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                                             ys.max() - ys.min() + 1]
        assert row["bbox"] == pytest.approx(expected_bbox)
        assert row["label"] == LABELS[label_id] and row["label_id"] == label_id
        assert row["topk_labels"] == [LABELS[i] for i in topk]
        assert len(row["prompt"]) == 4 and row["prompt_type"] == "box"
    assert len({row["annotation_id"] for row in rows}) == 4


def test_annotation_ids_are_stable_distinct_and_bounded():
    assert annotation_id("a.jpg", 3) == annotation_id("a.jpg", 3)
    ids = {annotation_id(f"s3://b/{i}.jpg", j) for i in range(200) for j in range(5)}
    # <= 2^53 - 1: exact as a JavaScript number (a float64), as CVAT, Label Studio and browsers read COCO ids.
    assert len(ids) == 1000 and all(0 <= i <= MAX_SAFE_ID and int(float(i)) == i for i in ids)
    assert json.loads(json.dumps({"id": max(ids)}), parse_int=float)["id"] == max(ids)
    # Stable across versions and machines: a pinned value (changing it renumbers every existing output).
    assert annotation_id("s3://bucket/a.jpg", 1) == 8187251200950273
    with pytest.raises(TooManyAnnotationsError):
        annotation_id("a.jpg", MAX_ANNOTATIONS_PER_IMAGE)


def test_validate_names_missing_mistyped_and_null_columns():
    good = pa.table({"image_uri": ["a"], "width": [3], "height": [4], "status": ["ok"], "error_kind": [None],
                     "error": [None], "num_annotations": [0]})
    assert validate(good, IMAGES_SCHEMA).schema.equals(IMAGES_SCHEMA)
    with pytest.raises(SchemaError, match="missing columns"):
        validate(good.drop_columns(["status"]), IMAGES_SCHEMA)
    with pytest.raises(SchemaError, match="may not be null"):
        validate(good.set_column(0, "image_uri", pa.array([None], pa.string())), IMAGES_SCHEMA)
    with pytest.raises(SchemaError, match="width"):
        validate(good.set_column(1, "width", pa.array(["wide"])), IMAGES_SCHEMA)


def test_coco_export_loads_in_pycocotools_and_masks_round_trip(tmp_path):
    predictions = {f"file:///data/{i}.jpg": random_prediction(10 + i, 24 + i, 32, 3) for i in range(3)}
    annotations = AnnotationColumns.empty()
    for uri, prediction in predictions.items():
        annotations.extend(AnnotationColumns.from_prediction(uri, prediction, LABELS))
    images = pa.table({
        "image_uri": [*predictions, "file:///data/broken.jpg"],
        "width": [32, 32, 32, None], "height": [24, 25, 26, None],
        "status": ["ok", "ok", "ok", "error"], "error_kind": [None, None, None, "corrupt"],
        "error": [None, None, None, "damaged"], "num_annotations": [3, 3, 3, 0]}, schema=IMAGES_SCHEMA)
    path = tmp_path / "coco.json"
    with open(path, "w") as out:
        counts = write_coco(out, [images], [annotations.to_table()], LABELS, {"description": "test"})
    assert (counts.images, counts.annotations) == (3, 9)

    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(LABELS)
    assert {img["file_name"] for img in coco.dataset["images"]} == set(predictions)  # error row excluded
    for row in annotations.to_table().to_pylist():
        coco_annotation = coco.anns[row["annotation_id"]]
        image = coco.imgs[coco_annotation["image_id"]]
        expected = predictions[image["file_name"]].masks[row["annotation_id"] & (MAX_ANNOTATIONS_PER_IMAGE - 1)]
        np.testing.assert_array_equal(coco.annToMask(coco_annotation).astype(bool), expected)
        assert coco_annotation["category_id"] == row["label_id"] + 1
        assert mask_utils.area(coco_annotation["segmentation"]) == coco_annotation["area"]


def test_coco_export_refuses_duplicate_annotation_ids(tmp_path):
    columns = AnnotationColumns.from_prediction("x.jpg", random_prediction(3, 8, 8, 2), LABELS)
    images = pa.table({"image_uri": ["x.jpg"], "width": [8], "height": [8], "status": ["ok"], "error_kind": [None],
                       "error": [None], "num_annotations": [2]}, schema=IMAGES_SCHEMA)
    table = columns.to_table()
    with open(tmp_path / "c.json", "w") as out, pytest.raises(ValueError, match="appears twice"):
        write_coco(out, [images], [table, table], LABELS, {})
