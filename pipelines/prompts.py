"""Box prompts for box mode, read from a COCO JSON or a Parquet table, keyed by image name.

* COCO JSON: ``images[].file_name`` names the image; each ``annotations[]`` entry with a ``bbox``
  (``[x, y, width, height]``, pixels) is one box prompt for its ``image_id``. Other fields are ignored.
* Parquet: one row per box with columns ``image`` (string) and ``bbox`` (list of 4 numbers, the same
  COCO ``[x, y, width, height]``).

An image name matches an input when it equals the input's full URI or its path relative to the input
folder/prefix (for a manifest: the line as written). Boxes are returned as x1, y1, x2, y2.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq

from ovsam.redaction import redact_text, redact_uri
from pipelines.storage import RETRY_HINT, STORAGE_ATTEMPTS, is_transient, open_fs


class PromptsFileError(ValueError):
    """The prompts file cannot be read or has the wrong layout; the message says what is wrong."""


def load_box_prompts(spec: str, endpoint_url: str | None = None,
                     attempts: int = STORAGE_ATTEMPTS) -> dict[str, np.ndarray]:
    """Image name → [N, 4] float32 boxes x1, y1, x2, y2 (pixels), from a COCO JSON or Parquet file, read with
    ``attempts`` tries per request (the run's ``--storage-attempts``)."""
    fs, path = open_fs(spec, endpoint_url, attempts)
    shown = redact_uri(spec)
    try:
        with fs.open(path, "rb") as source:
            data = source.read()
    except Exception as err:  # noqa: BLE001 - any fetch failure is one clear message
        raise PromptsFileError(f"cannot read prompts file {shown}: {type(err).__name__}: {redact_text(str(err))}"
                               + (RETRY_HINT if is_transient(err) else "")) from None
    if path.lower().endswith(".parquet"):
        return _from_parquet(data, shown)
    return _from_coco(data, shown)


def _from_coco(data: bytes, shown: str) -> dict[str, np.ndarray]:
    try:
        coco = json.loads(data)
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        boxes: dict[str, list] = defaultdict(list)
        for annotation in coco.get("annotations", []):
            if "bbox" in annotation:
                boxes[names[annotation["image_id"]]].append(annotation["bbox"])
    except (ValueError, KeyError, TypeError) as err:
        raise PromptsFileError(f"prompts file {shown} is not COCO JSON with images[].file_name and "
                               f"annotations[].bbox: {type(err).__name__}: {err}") from None
    return {name: _xywh_to_xyxy(rows, shown) for name, rows in boxes.items()}


def _from_parquet(data: bytes, shown: str) -> dict[str, np.ndarray]:
    import pyarrow as pa

    try:
        table = pq.read_table(pa.BufferReader(data), columns=["image", "bbox"])
    except (pa.ArrowInvalid, KeyError) as err:
        raise PromptsFileError(f"prompts file {shown} is not Parquet with columns image, bbox: {err}") from None
    boxes: dict[str, list] = defaultdict(list)
    for image, bbox in zip(table.column("image").to_pylist(), table.column("bbox").to_pylist()):
        boxes[image].append(bbox)
    return {name: _xywh_to_xyxy(rows, shown) for name, rows in boxes.items()}


def _xywh_to_xyxy(rows: list, shown: str) -> np.ndarray:
    try:
        xywh = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError):
        xywh = None
    if xywh is None or xywh.ndim != 2 or xywh.shape[1] != 4:
        raise PromptsFileError(f"prompts file {shown}: every bbox must be 4 numbers [x, y, width, height]") from None
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
