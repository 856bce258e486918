"""Read the outputs of `ovsam-batch label` for viewing: only the columns needed, in bounded memory.

An output prefix (local path or any fsspec URL such as ``s3://bucket/run``) holds
committed ``images/*.parquet`` and ``annotations/*.parquet`` (read through `schemas.committed`, the one reader
of committed rows) and, when the run wrote them,
``run.json`` (run summary) and ``eval.json`` (written by ``ovsam-batch eval``).

Nothing here loads a whole table. Tables are scanned batch by batch through `pyarrow.dataset` with a
column projection and, where a filter is given, a pushed-down filter expression. Samples are chosen by
hashing (the ``n`` keys with the smallest seeded hash): the choice is deterministic, does not depend on
the order or the number of Parquet parts, and needs memory for ``n`` keys only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ovsam.images import DecodeError, decode_image
from ovsam.redaction import redact_text, redact_uri
from pipelines.storage import open_fs, storage_options
from schemas.committed import CommittedTables
from schemas.tables import ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA, EVAL_FILE, IMAGES_DIR, STATUS_OK, SchemaError

# Columns an overlay needs from the annotations table.
DRAW_COLUMNS = ("image_uri", "annotation_id", "bbox", "segmentation", "label", "score")


class VizError(Exception):
    """An output cannot be read or a request cannot be met; the message is meant for a person."""


@dataclasses.dataclass(frozen=True)
class AnnotationFilter:
    """Which annotations to look at. Empty ``labels`` means every label; scores are inclusive bounds in [0, 1]."""

    labels: tuple[str, ...] = ()
    min_score: float = 0.0
    max_score: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= self.max_score <= 1.0:
            raise VizError(
                f"score range must satisfy 0 <= min <= max <= 1, got min {self.min_score}, max {self.max_score}"
            )

    @property
    def is_everything(self) -> bool:
        return not self.labels and self.min_score == 0.0 and self.max_score == 1.0

    def expression(self) -> ds.Expression | None:
        """The filter as a pyarrow expression (pushed down into the Parquet scan), or None for no filter."""
        if self.is_everything:
            return None
        expr = (pc.field("score") >= self.min_score) & (pc.field("score") <= self.max_score)
        if self.labels:
            expr = expr & pc.field("label").isin(list(self.labels))
        return expr


def seeded_hash(key: str, seed: int) -> int:
    """A stable 64-bit hash of ``key`` under ``seed`` (same on every machine and Python run)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little")


class BottomK:
    """The ``k`` distinct keys with the smallest seeded hash among all keys offered; memory O(k)."""

    def __init__(self, k: int, seed: int) -> None:
        self.k = k
        self.seed = seed
        self._heap: list[tuple[int, str]] = []  # (-hash, key): the root is the largest kept hash
        self._kept: set[str] = set()

    def offer(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self._kept:
                continue
            h = seeded_hash(key, self.seed)
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, (-h, key))
                self._kept.add(key)
            elif h < -self._heap[0][0]:
                _, dropped = heapq.heapreplace(self._heap, (-h, key))
                self._kept.discard(dropped)
                self._kept.add(key)

    def keys(self) -> list[str]:
        """The kept keys, smallest hash first."""
        return [key for _, key in sorted(self._heap, reverse=True)]


class LabelOutput:
    """An output prefix written by ``ovsam-batch label``, local or object storage."""

    def __init__(self, prefix: str, endpoint_url: str | None = None) -> None:
        """``endpoint_url``: S3-compatible endpoint for ``s3://`` prefixes (else ``AWS_ENDPOINT_URL`` or AWS)."""
        self.prefix = prefix.rstrip("/")
        self.display = redact_uri(self.prefix)  # for messages and pages: no credentials
        self.endpoint_url = endpoint_url
        try:
            self.fs, self.root = open_fs(self.prefix, endpoint_url)
            self.root = self.root.rstrip("/")
            found = self.fs.isdir(posixpath.join(self.root, IMAGES_DIR))
        # The first contact with the store: a bad URL, a missing driver, no credentials, an unreachable
        # endpoint. Each driver raises its own exception types (botocore's are not OSErrors).
        except Exception as err:  # noqa: BLE001 - reported to the user with its type, never swallowed
            raise VizError(f"cannot open label output {redact_uri(prefix)}: {type(err).__name__}: {err}") from err
        if not found:
            raise VizError(
                f"{redact_uri(prefix)} is not an output of `ovsam-batch label`: it has no {IMAGES_DIR}/ folder"
            )
        self.tables = CommittedTables(self.fs, self.root, self.display)

    def scan(
        self, table: str, columns: Sequence[str], filter: ds.Expression | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Batches of ``columns`` of the committed rows of table ``"images"`` or ``"annotations"`` matching
        ``filter`` (`schemas.committed.CommittedTables.scan`)."""
        try:
            yield from self.tables.scan(table, columns, filter)
        except SchemaError as err:
            raise VizError(str(err)) from err
        except (OSError, pa.ArrowInvalid) as err:
            raise VizError(f"cannot read the {table} table under {self.display}: {err}") from err

    def read_json(self, name: str) -> dict | None:
        """``name`` (e.g. ``run.json``) under the prefix as a dict, or None when the run did not write it."""
        path = posixpath.join(self.root, name)
        if not self.fs.exists(path):
            return None
        try:
            with self.fs.open(path, "rb") as handle:
                value = json.load(handle)
        except (OSError, ValueError) as err:
            raise VizError(f"cannot read {self.display}/{name}: {err}") from err
        if not isinstance(value, dict):
            raise VizError(f"{self.display}/{name} holds a {type(value).__name__}, expected a JSON object")
        return value

    def resolve_images(self, wanted: Sequence[str]) -> list[str]:
        """Map each requested image (full ``image_uri``, or a suffix such as its file name) to its ``image_uri``.

        Scans the ``image_uri`` column once. Raises `VizError` naming every request that matches no image
        or more than one.
        """
        matches: dict[str, set[str]] = {w: set() for w in wanted}
        for batch in self.scan(IMAGES_DIR, ["image_uri"]):
            uris = batch.column("image_uri")
            for w in wanted:
                hit = pc.or_(pc.equal(uris, w), pc.ends_with(uris, "/" + w.lstrip("/")))
                matches[w].update(uris.filter(hit).to_pylist())
        missing = [w for w, found in matches.items() if not found]
        if missing:
            raise VizError(f"no image in {self.display} matches {', '.join(map(repr, missing))}")
        ambiguous = {w: sorted(found) for w, found in matches.items() if len(found) > 1 and w not in found}
        if ambiguous:
            details = "; ".join(f"{w!r} matches {len(f)} images, e.g. {f[0]}" for w, f in ambiguous.items())
            raise VizError(f"ambiguous image names ({details}); give the full image_uri")
        return list(dict.fromkeys(w if w in found else next(iter(found)) for w, found in matches.items()))

    def sample_images(self, n: int, seed: int, annotation_filter: AnnotationFilter) -> list[str]:
        """Up to ``n`` image URIs chosen by seeded hash, smallest hash first.

        Without a filter: among all decoded (status ok) images. With one: among the images that have at
        least one annotation passing it (scans only ``image_uri``, ``label``, ``score``).
        """
        sample = BottomK(n, seed)
        if annotation_filter.is_everything:
            for batch in self.scan(IMAGES_DIR, ["image_uri"], pc.field("status") == STATUS_OK):
                sample.offer(batch.column("image_uri").to_pylist())
        else:
            for batch in self.scan(ANNOTATIONS_DIR, ["image_uri"], annotation_filter.expression()):
                sample.offer(pc.unique(batch.column("image_uri")).to_pylist())
        return sample.keys()

    def image_rows(self, uris: Sequence[str]) -> dict[str, dict]:
        """Rows of the images table for ``uris``: image_uri -> {width, height, status, error_kind, error,
        num_annotations}."""
        rows = {}
        columns = ["image_uri", "width", "height", "status", "error_kind", "error", "num_annotations"]
        for batch in self.scan(IMAGES_DIR, columns, pc.field("image_uri").isin(list(uris))):
            for row in batch.to_pylist():
                rows[row["image_uri"]] = row
        return rows

    def annotations_of(
        self, uris: Sequence[str], annotation_filter: AnnotationFilter, columns: Sequence[str] = DRAW_COLUMNS
    ) -> pa.Table:
        """The annotations of ``uris`` passing ``annotation_filter``, sorted by (image_uri, annotation_id)."""
        expr = pc.field("image_uri").isin(list(uris))
        if (extra := annotation_filter.expression()) is not None:
            expr = expr & extra
        batches = list(self.scan(ANNOTATIONS_DIR, columns, expr))
        table = pa.Table.from_batches(batches, _projected(ANNOTATIONS_SCHEMA, columns))
        return table.sort_by([("image_uri", "ascending"), ("annotation_id", "ascending")])

    def annotations_by_id(self, annotation_ids: Sequence[int], columns: Sequence[str] = DRAW_COLUMNS) -> pa.Table:
        """The annotations whose ``annotation_id`` is in ``annotation_ids``."""
        batches = list(self.scan(ANNOTATIONS_DIR, columns, pc.field("annotation_id").isin(list(annotation_ids))))
        return pa.Table.from_batches(batches, _projected(ANNOTATIONS_SCHEMA, columns))


def _projected(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    return pa.schema([schema.field(name) for name in columns])


def read_source_image(uri: str, endpoint_url: str | None = None) -> np.ndarray:
    """The source image at ``uri`` (any fsspec URL or path) as RGB uint8 [H, W, 3], EXIF orientation applied.

    That is the frame the label tables' coordinates are in. Raises `VizError` when it cannot be read.
    """
    try:
        with fsspec.open(uri, "rb", **storage_options(uri, endpoint_url)) as handle:
            data = handle.read()
    except (OSError, ValueError) as err:
        raise VizError(f"cannot read source image {redact_uri(uri)}: {type(err).__name__}: {redact_text(str(err))}") from err
    try:
        return decode_image(data)
    except DecodeError as err:
        raise VizError(f"cannot read source image {redact_uri(uri)}: {err}") from err
