"""COCO instance-segmentation JSON from the label tables, written as a stream.

Mapping (loads in ``pycocotools.coco.COCO``; masks decode bit-exactly to the Parquet RLE):

* ``categories``: one per vocabulary class, ``id = label_id + 1`` (COCO ids start at 1), ``name`` = label.
* ``images``: the ``images`` rows with ``status == "ok"``, ``id`` = 1, 2, ... in table order (across shards),
  ``file_name`` = ``image_uri``, ``width``/``height`` after EXIF orientation. Error rows stay in Parquet.
* ``annotations``: ``id`` = ``annotation_id``; ``bbox``, ``area``, ``segmentation`` (compressed RLE, counts as
  ASCII text) as in Parquet; ``iscrowd`` 0; ``score`` the label's probability (what ``COCO.loadRes`` and
  COCOeval read for detections).

Tables are consumed one at a time, so memory holds one part plus the image-id map, not the whole output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import TextIO

import pyarrow as pa

from schemas.tables import STATUS_OK

COCO_CATEGORY_ID_OFFSET = 1  # category_id = label_id + 1


@dataclasses.dataclass(frozen=True)
class CocoCounts:
    images: int
    annotations: int


def write_coco(out: TextIO, images: Iterable[pa.Table], annotations: Iterable[pa.Table],
               label_names: Sequence[str], info: dict, first_image_id: int = 1) -> CocoCounts:
    """Write one COCO JSON document to ``out`` from ``images`` then ``annotations`` tables (label-table schemas).

    ``label_names[i]`` is the class of ``label_id`` i; ``info`` becomes the document's ``info`` object. Image ids
    count from ``first_image_id``, so that the shards of one export never share an id.
    Raises ValueError for an annotation whose image has no ``ok`` row, or a repeated annotation id.
    """
    out.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ')
    json.dump([{"id": i + COCO_CATEGORY_ID_OFFSET, "name": name, "supercategory": ""}
               for i, name in enumerate(label_names)], out)

    out.write(', "images": [')
    image_ids: dict[str, int] = {}
    for table in images:
        for row in table.select(["image_uri", "width", "height", "status"]).to_pylist():
            if row["status"] != STATUS_OK:
                continue
            image_ids[row["image_uri"]] = len(image_ids) + first_image_id
            out.write(("," if len(image_ids) > 1 else "") + json.dumps(
                {"id": image_ids[row["image_uri"]], "file_name": row["image_uri"],
                 "width": row["width"], "height": row["height"]}))

    out.write('], "annotations": [')
    seen_ids: set[int] = set()
    columns = ["image_uri", "annotation_id", "bbox", "segmentation", "area", "label_id", "score"]
    for table in annotations:
        for row in table.select(columns).to_pylist():
            if row["image_uri"] not in image_ids:
                raise ValueError(f"annotation {row['annotation_id']} refers to {row['image_uri']!r}, "
                                 "which has no 'ok' row in the images table")
            if row["annotation_id"] in seen_ids:
                raise ValueError(f"annotation id {row['annotation_id']} appears twice")
            out.write(("," if seen_ids else "") + json.dumps({
                "id": row["annotation_id"], "image_id": image_ids[row["image_uri"]],
                "category_id": row["label_id"] + COCO_CATEGORY_ID_OFFSET, "bbox": row["bbox"],
                "area": row["area"], "segmentation": row["segmentation"], "iscrowd": 0,
                "score": row["score"]}))
            seen_ids.add(row["annotation_id"])
    out.write("]}")
    return CocoCounts(images=len(image_ids), annotations=len(seen_ids))
