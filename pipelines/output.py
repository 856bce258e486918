"""The output prefix: layout, atomic part publishing, resume bookkeeping and the COCO export.

Layout under OUTPUT::

    images/part-<id>.parquet        one row per input image (IMAGES_SCHEMA)
    annotations/part-<id>.parquet   the annotations of exactly the images in images/part-<id>.parquet
    run.json                        the last run: config (no secrets), model, vocabulary, counts, time
    coco.json                       COCO export of all parts (with --coco)

Commit protocol: a batch is written as a pair of parts with the same id. Each part is published
atomically (see `open_for_publish`), annotations first, then images; the images part is the commit
record. A run killed between the two leaves an annotations part without its images part: it is removed
when the next run starts, and its images are labelled again (they have no images row), so every image
appears exactly once and no annotation twice. Readers should join through the images parts (see
`committed_parts`); a concurrent reader may briefly see an annotations part whose images part is not
published yet.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import io
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.predict import deserialize
from pipelines.storage import is_local, join, open_for_publish, open_fs, publish_bytes
from schemas.coco import CocoCounts, write_coco
from schemas.tables import (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA, COCO_FILE, IMAGES_DIR, IMAGES_SCHEMA, RUN_FILE,
                           SCHEMA_VERSION, SCHEMA_VERSION_KEY, STATUS_OK, validate)
PART_SUFFIX = ".parquet"
RUN_METADATA_KEY = b"ovsam_batch.run"
# Parallel reads of existing parts when a run resumes (object stores answer many small reads best in
# parallel; a local disk does not mind).
_READ_THREADS = 16


class OutputError(ValueError):
    """The output prefix holds something this run must not write into; the message says what."""


class OutputStore:
    """Reads and writes the label tables under one output prefix (local path or fsspec URL)."""

    def __init__(self, output: str, endpoint_url: str | None = None):
        self.output = output
        self.endpoint_url = endpoint_url
        self.fs, self.root = open_fs(output, endpoint_url)

    def path(self, *names: str) -> str:
        return join(self.root, *names)

    def url(self, *names: str) -> str:
        """Protocol-qualified location of ``names`` under the output, for people to read."""
        return join(self.output, *names)

    # --- writing ------------------------------------------------------------------------------------

    def write_part(self, images: pa.Table, annotations: pa.Table, metadata: dict) -> str:
        """Validate and publish one pair of parts (annotations, then images); return the part id."""
        images = _with_metadata(validate(images, IMAGES_SCHEMA), metadata)
        annotations = _with_metadata(validate(annotations, ANNOTATIONS_SCHEMA), metadata)
        part_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        name = f"part-{part_id}{PART_SUFFIX}"
        publish_bytes(self.fs, self.path(ANNOTATIONS_DIR, name), _parquet_bytes(annotations))
        publish_bytes(self.fs, self.path(IMAGES_DIR, name), _parquet_bytes(images))
        return part_id

    def write_run_record(self, record: dict) -> None:
        publish_bytes(self.fs, self.path(RUN_FILE), json.dumps(record, indent=2).encode())

    def write_coco(self, label_names: list[str], info: dict) -> CocoCounts:
        """Publish coco.json built from every committed part (streamed; one part in memory at a time)."""
        names = self.committed_parts()
        with open_for_publish(self.fs, self.path(COCO_FILE), "wt") as out:
            return write_coco(out, (self._read(IMAGES_DIR, n) for n in names),
                              (self._read(ANNOTATIONS_DIR, n) for n in names), label_names, info)

    # --- reading / resume ---------------------------------------------------------------------------

    def read_run_record(self) -> dict | None:
        if not self.fs.exists(self.path(RUN_FILE)):
            return None
        return json.loads(self.fs.cat_file(self.path(RUN_FILE)))

    def committed_parts(self) -> list[str]:
        """Names of the parts whose images part is published (the committed ones), sorted."""
        return sorted(self._part_names(IMAGES_DIR))

    def recover(self) -> int:
        """Remove what an interrupted run left: annotations parts without their images part, and local temp
        files. Returns the number of orphaned annotations parts removed."""
        committed = set(self._part_names(IMAGES_DIR))
        orphans = [n for n in self._part_names(ANNOTATIONS_DIR) if n not in committed]
        for name in orphans:
            self.fs.rm(self.path(ANNOTATIONS_DIR, name))
        if is_local(self.fs):
            for folder in (IMAGES_DIR, ANNOTATIONS_DIR, ""):
                for temp in self.fs.glob(self.path(folder, ".*.tmp")):
                    self.fs.rm(temp)
        return len(orphans)

    def done_uris(self) -> set[str]:
        """``image_uri`` of every images row already committed (labelled or error): what a re-run skips.

        Raises `OutputError` if a part was written with another schema version.
        """
        names = self.committed_parts()
        with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
            tables = list(pool.map(lambda n: self._read(IMAGES_DIR, n, columns=["image_uri"]), names))
        return {uri for table in tables for uri in table.column("image_uri").to_pylist()}

    def status_counts(self) -> tuple[collections.Counter, int]:
        """Over all committed parts: Counter of ``"ok"`` / error kinds per image, and the annotation count."""
        counts: collections.Counter = collections.Counter()
        annotations = 0
        for name in self.committed_parts():
            table = self._read(IMAGES_DIR, name, columns=["status", "error_kind", "num_annotations"])
            for status, kind in zip(table.column("status").to_pylist(), table.column("error_kind").to_pylist()):
                counts[STATUS_OK if status == STATUS_OK else kind] += 1
            annotations += int(pc.sum(table.column("num_annotations")).as_py() or 0)
        return counts, annotations

    def read_table(self, kind: str) -> pa.Table:
        """All committed rows of ``kind`` (``"images"`` or ``"annotations"``) as one table (small outputs, tests)."""
        schema = IMAGES_SCHEMA if kind == IMAGES_DIR else ANNOTATIONS_SCHEMA
        tables = [self._read(kind, name) for name in self.committed_parts()]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def _part_names(self, folder: str) -> list[str]:
        if not self.fs.exists(self.path(folder)):
            return []
        return [p.rsplit("/", 1)[-1] for p in self.fs.glob(self.path(folder, f"part-*{PART_SUFFIX}"))]

    def _read(self, folder: str, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(folder, name), "rb") as source:
            table = pq.read_table(source, columns=columns)
        version = (table.schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"").decode()
        if version != SCHEMA_VERSION:
            raise OutputError(f"{self.url(folder, name)} has label-table schema version {version or 'none'}, this "
                              f"ovsam-batch writes version {SCHEMA_VERSION}; write to a new --output")
        return table


def _with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({**table.schema.metadata, RUN_METADATA_KEY: json.dumps(metadata).encode()})


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


class WriteParts:
    """Ray Data stage: a batch of `LabelImages` result rows → one published pair of parts → one summary row.

    Summary columns: ``images``, ``ok``, ``annotations`` (counts) and ``error_kinds`` (JSON object kind → count).
    """

    def __init__(self, output: str, endpoint_url: str | None, metadata: dict):
        self.store = OutputStore(output, endpoint_url)
        self.metadata = metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["status"] == STATUS_OK
        undecoded = batch["width"] < 0  # decode errors have no size; prompt or model errors do
        images = pa.table({
            "image_uri": list(batch["image_uri"]),
            "width": pa.array(batch["width"], pa.int32(), mask=undecoded),
            "height": pa.array(batch["height"], pa.int32(), mask=undecoded),
            "status": list(batch["status"]),
            "error_kind": pa.array(list(batch["error_kind"]), pa.string(), mask=ok),
            "error": pa.array(list(batch["error"]), pa.string(), mask=ok),
            "num_annotations": pa.array(batch["num_annotations"], pa.int32()),
        })
        parts = [deserialize(data) for data in batch["annotations"] if len(data)]
        annotations = pa.concat_tables(parts) if parts else ANNOTATIONS_SCHEMA.empty_table()
        self.store.write_part(images, annotations, self.metadata)
        kinds = collections.Counter(kind for kind, good in zip(batch["error_kind"], ok) if not good)
        return {"images": np.array([len(ok)]), "ok": np.array([int(ok.sum())]),
                "annotations": np.array([annotations.num_rows]), "error_kinds": np.array([json.dumps(kinds)])}
