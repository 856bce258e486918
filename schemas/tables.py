"""Arrow schemas of the label tables: the contract between `label` and everything that reads its output.

Two tables are written under an output prefix:

* ``images``: one row per input image, labelled or not. ``status`` is ``"ok"`` or ``"error"``; an error
  row carries ``error_kind`` (a short machine-readable reason such as ``corrupt``, ``empty``,
  ``too_large``, ``unreadable``, ``prompt_outside_image``) and ``error`` (a sentence for a person).
* ``annotations``: one row per predicted object. Coordinates are pixels of the original image after EXIF
  orientation, origin top-left; ``bbox`` is COCO ``[x, y, width, height]`` of the predicted mask;
  ``segmentation`` is COCO compressed RLE (column-major, as pycocotools writes it).

Every file carries ``SCHEMA_VERSION`` under the ``ovsam_batch.schema_version`` metadata key. A change of
column meaning or type bumps the version.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"ovsam_batch.schema_version"

# Layout of a label output prefix (local folder or object-storage prefix).
IMAGES_DIR = "images"  # Parquet parts of the images table
ANNOTATIONS_DIR = "annotations"  # Parquet parts of the annotations table, one per images part
STAGING_DIR = "_staging"  # parts being written or published; table readers ignore `_`-prefixed paths
RUN_FILE = "run.json"  # the last run's settings (no secrets), model, vocabulary, counts
COCO_FILE = "coco.json"  # COCO instances export, on request, for outputs of at most COCO_SHARD_IMAGES images
COCO_DIR = "coco"  # the export of larger outputs: coco/part-<n>.json of at most COCO_SHARD_IMAGES images each
# Images per COCO JSON: at ~64 masks an image (automatic mode) a shard is a few hundred MB of JSON, about what
# pycocotools loads in a minute and a few GB of Python objects; larger outputs are written as shards.
COCO_SHARD_IMAGES = 10_000
EVAL_FILE = "eval.json"  # written by `ovsam-batch eval`

STATUS_OK = "ok"
STATUS_ERROR = "error"

RLE_TYPE = pa.struct([
    pa.field("size", pa.list_(pa.int32(), 2), nullable=False),  # [height, width]
    pa.field("counts", pa.string(), nullable=False),  # pycocotools compressed counts, ASCII
])

IMAGES_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),  # null when the image could not be decoded
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_kind", pa.string()),
    pa.field("error", pa.string()),
    pa.field("num_annotations", pa.int32(), nullable=False),
], metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})

ANNOTATIONS_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    # Stable across re-runs: derived from (image_uri, index of the prediction within the image).
    pa.field("annotation_id", pa.int64(), nullable=False),
    pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # x, y, width, height in pixels
    pa.field("segmentation", RLE_TYPE, nullable=False),
    pa.field("area", pa.int64(), nullable=False),  # mask pixel count
    pa.field("label", pa.string(), nullable=False),
    pa.field("label_id", pa.int32(), nullable=False),  # index into the run's vocabulary
    pa.field("score", pa.float32(), nullable=False),  # fused class probability of `label`
    pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
    pa.field("topk_label_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
    pa.field("prompt_type", pa.string(), nullable=False),  # "box", "point" or "grid" (automatic mode)
    # Box prompts: x1, y1, x2, y2; point prompts: x, y. Original-image pixels.
    pa.field("prompt", pa.list_(pa.float32()), nullable=False),
], metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()})


class SchemaError(ValueError):
    """A table does not match the label-table contract."""


def validate(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Check that ``table`` has exactly ``schema``'s columns and types; return it cast to ``schema``.

    Raises `SchemaError` naming every missing, unexpected or mistyped column, or the first null in a
    non-nullable column.
    """
    problems = []
    names = set(table.column_names)
    expected = set(schema.names)
    if missing := sorted(expected - names):
        problems.append(f"missing columns {missing}")
    if unexpected := sorted(names - expected):
        problems.append(f"unexpected columns {unexpected}")
    if problems:
        raise SchemaError("; ".join(problems))
    table = table.select(schema.names)
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise SchemaError(f"column {field.name!r} has type {column.type}, expected {field.type}") from err
        if not field.nullable and column.null_count:
            raise SchemaError(f"column {field.name!r} has {column.null_count} nulls but may not be null")
    return table.cast(schema)
