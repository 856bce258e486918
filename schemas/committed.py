"""The one reader of a label output's committed rows: resume, eval, show, report and the COCO export use it.

Layout of an output prefix (see `pipelines.output` for how parts are written)::

    images/part-<id>.parquet        committed images rows (IMAGES_SCHEMA)
    annotations/part-<id>.parquet   the annotations of exactly the images of images/part-<id>.parquet
    _staging/<id>/...               parts being written or published; hidden from every table reader

Only committed files ever appear under ``images/`` and ``annotations/``, so a plain reader
(``pyarrow.dataset.dataset(OUTPUT + "/annotations")``, DuckDB ``read_parquet``, Spark) reads committed rows
only. A part is published annotations first, images last: while a publish is in flight (or after a kill
in the middle of one, until the next run rolls it forward) the annotations table may show a part whose
images rows are not visible yet. This reader takes exactly the parts listed under ``images/`` (the
images file is published last), so the two tables it gives always agree.

Every file carries the label-table schema version (`schemas.tables.SCHEMA_VERSION_KEY`); a part of another
version raises `SchemaError` when it is read, whichever reader reads it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds

from schemas.tables import (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA, IMAGES_DIR, IMAGES_SCHEMA, SCHEMA_VERSION,
                            SCHEMA_VERSION_KEY, SchemaError)

PART_SUFFIX = ".parquet"
# Rows per scanned batch: large enough to amortise Python overhead, small enough (a few MB of the
# projected columns) that a scan's memory stays flat whatever the table size.
SCAN_BATCH_ROWS = 65_536
# Parts decoded ahead of the consumer. pyarrow's default (4 parts, 16 batches) makes peak memory grow with
# the part count up to 4 decoded parts; 2 keeps one part in flight while the next is read (object-store
# latency hidden), so memory is bounded by about two parts' projected columns.
SCAN_READAHEAD = 2
TABLE_SCHEMAS = {IMAGES_DIR: IMAGES_SCHEMA, ANNOTATIONS_DIR: ANNOTATIONS_SCHEMA}


def part_file(table: str, part_id: str) -> str:
    """Path of part ``part_id`` of ``table`` relative to the output root."""
    return f"{table}/part-{part_id}{PART_SUFFIX}"


class CommittedTables:
    """Committed rows of the label tables under ``root`` of filesystem ``fs``; ``display`` names it in messages."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, display: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.display = display

    def part_ids(self) -> list[str]:
        """Ids of the committed parts (those whose images file is published), sorted."""
        folder = posixpath.join(self.root, IMAGES_DIR)
        self.fs.invalidate_cache(folder)
        if not self.fs.isdir(folder):
            return []
        names = (posixpath.basename(p) for p in self.fs.glob(posixpath.join(folder, f"part-*{PART_SUFFIX}")))
        return sorted(name[len("part-"):-len(PART_SUFFIX)] for name in names)

    def files(self, table: str, part_ids: Sequence[str] | None = None) -> list[str]:
        """Paths (in ``fs``) of the committed files of ``table`` (``"images"`` or ``"annotations"``)."""
        ids = self.part_ids() if part_ids is None else part_ids
        return [posixpath.join(self.root, part_file(table, part_id)) for part_id in ids]

    def scan(self, table: str, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,
             part_ids: Sequence[str] | None = None, batch_rows: int = SCAN_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Non-empty batches of ``columns`` (default all) of the committed rows of ``table`` matching ``filter``.

        Memory: about `SCAN_READAHEAD` parts' projected columns. Raises `SchemaError` when a part has another
        schema version.
        """
        files = self.files(table, part_ids)
        if not files:
            return
        dataset = ds.dataset(files, schema=TABLE_SCHEMAS[table], format="parquet", filesystem=self.fs)
        scanner = dataset.scanner(columns=None if columns is None else list(columns), filter=filter,
                                  batch_size=batch_rows, fragment_readahead=SCAN_READAHEAD,
                                  batch_readahead=SCAN_READAHEAD)
        checked: set[str] = set()
        for tagged in scanner.scan_batches():
            if tagged.fragment.path not in checked:
                self._check_version(tagged.fragment)
                checked.add(tagged.fragment.path)
            if tagged.record_batch.num_rows:
                yield tagged.record_batch

    def read(self, table: str, columns: Sequence[str] | None = None, filter: ds.Expression | None = None,
             part_ids: Sequence[str] | None = None) -> pa.Table:
        """All matching committed rows of ``table`` as one table (for bounded outputs: eval, tests, one part)."""
        schema = TABLE_SCHEMAS[table]
        if columns is not None:
            schema = pa.schema([schema.field(name) for name in columns])
        return pa.Table.from_batches(list(self.scan(table, columns, filter, part_ids)), schema)

    def _check_version(self, fragment: ds.ParquetFileFragment) -> None:
        version = (fragment.physical_schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"").decode()
        if version != SCHEMA_VERSION:
            name = fragment.path[len(self.root) + 1:] if fragment.path.startswith(self.root + "/") else fragment.path
            raise SchemaError(f"{self.display}/{name} has label-table schema version {version or 'none'}, this "
                              f"ovsam-batch reads and writes version {SCHEMA_VERSION}")
