"""The output prefix: writing and publishing parts, recovery after a kill, resume bookkeeping, COCO export.

Layout under OUTPUT (readers: `schemas.committed`)::

    images/part-<id>.parquet        one row per input image (IMAGES_SCHEMA), committed parts only
    annotations/part-<id>.parquet   the annotations of exactly the images in images/part-<id>.parquet
    _staging/<id>/                  a part being written or published (hidden: `_` prefix, outside the tables)
    run.json                        the last run: config (no secrets), model, vocabulary, counts, time, status
    _lease.json                     the running run's lease (one writing run per output, see `Lease`)
    coco.json                       COCO export of all parts (with --coco), up to COCO_SHARD_IMAGES images
    coco/part-<n>.json              the same export in shards of COCO_SHARD_IMAGES images, for larger outputs

Commit protocol of one part (each file write is atomic: temp + rename locally, one PUT on object stores):

1. stage ``_staging/<id>/annotations.parquet``;
2. stage ``_staging/<id>/images.parquet``: **the commit point** (both files of the part are complete);
3. move the annotations file to ``annotations/part-<id>.parquet``;
4. move the images file to ``images/part-<id>.parquet``;
5. remove ``_staging/<id>/``.

Nothing under the table folders is ever uncommitted, so plain readers (pyarrow, DuckDB, Spark) see only
committed rows. A kill before step 2 leaves a staging folder without an images file: the next run rolls it
back (removes it; its images have no images row, so they are labelled again). A kill after step 2 leaves a
committed part not yet (fully) published: the next run rolls it forward (finishes steps 3–5). Every image
therefore ends up exactly once, and no annotation twice. Recovery assumes one writing run per output, which
the lease enforces.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import io
import json
import math
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.decode import DEFERRED
from pipelines.predict import deserialize
from ovsam.redaction import redact_uri
from pipelines.storage import (RETRY_HINT, STORAGE_ATTEMPTS, create_exclusive, error_reason, is_local, is_transient,
                               join, open_for_publish, open_fs, publish_bytes, read_versioned,
                               replace_if_unchanged)
from schemas.coco import write_coco
from schemas.committed import CommittedTables, part_file
from schemas.tables import (ANNOTATIONS_DIR, ANNOTATIONS_SCHEMA, COCO_DIR, COCO_FILE, COCO_SHARD_IMAGES, IMAGES_DIR,
                           IMAGES_SCHEMA, RUN_FILE, STAGING_DIR, STATUS_OK, SchemaError, validate)

RUN_METADATA_KEY = b"ovsam_batch.run"
# A part is published at this many bytes of buffered Arrow data at the latest, whatever --part-size says:
# it bounds a writer's memory, and readers handle files of tens to hundreds of MB best.
PART_MAX_BYTES = 256 * 2**20
# File names inside a part's staging folder.
_STAGED = {ANNOTATIONS_DIR: "annotations.parquet", IMAGES_DIR: "images.parquet"}


# The lease file under the output, and how long a lease holds without renewal: a run that died without
# releasing it (on another machine; on the same one a dead process is seen at once) blocks the output this long.
# The running run renews it every quarter of that, so a few slow or failed renewals in a row never lose it.
LEASE_FILE = "_lease.json"
LEASE_SECONDS = 120.0
_RENEW_EVERY_S = LEASE_SECONDS / 4
# Rounds of create / read / conditional replace one `Lease.acquire` tries: another round follows only when the
# lease changed between reading and replacing it (released, or taken over by a racing run and then seen live).
_TAKE_TRIES = 3
# Run ids of the leases this process holds now: a lease naming this process but none of these was left by an
# earlier run of it whose release failed (the storage refused the delete), and is stale.
_HELD_HERE: set[str] = set()


class OutputError(ValueError):
    """The output prefix holds something this run must not write into; the message says what."""


class WriteFailed(OSError):
    """Writing to the output failed after the storage retries; the message names the output and the cause."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What `OutputStore.recover` found: parts it finished publishing, and unfinished parts it removed."""

    rolled_forward: int
    rolled_back: int


class OutputStore:
    """Reads and writes the label tables under one output prefix (local path or fsspec URL)."""

    def __init__(self, output: str, endpoint_url: str | None = None, storage_attempts: int = STORAGE_ATTEMPTS):
        self.output = output
        self.endpoint_url = endpoint_url
        self.fs, self.root = open_fs(output, endpoint_url, storage_attempts)
        self.tables = CommittedTables(self.fs, self.root, redact_uri(output))

    def path(self, *names: str) -> str:
        return join(self.root, *names)

    def url(self, *names: str) -> str:
        """Protocol-qualified location of ``names`` under the output, for people to read."""
        return join(self.output, *names)

    # --- writing ------------------------------------------------------------------------------------

    def write_part(self, images: pa.Table, annotations: pa.Table, metadata: dict) -> str:
        """Validate, stage and publish one part (see the commit protocol above); return the part id."""
        images = _with_metadata(validate(images, IMAGES_SCHEMA), metadata)
        annotations = _with_metadata(validate(annotations, ANNOTATIONS_SCHEMA), metadata)
        part_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        for table, rows in ((ANNOTATIONS_DIR, annotations), (IMAGES_DIR, images)):  # images last: the commit
            publish_bytes(self.fs, self._staged(part_id, table), _parquet_bytes(rows))
        self._publish(part_id)
        return part_id

    def write_run_record(self, record: dict) -> None:
        publish_bytes(self.fs, self.path(RUN_FILE), json.dumps(record, indent=2).encode())

    def write_coco(self, label_names: list[str], info: dict, shard_images: int = COCO_SHARD_IMAGES) -> list[str]:
        """Publish the COCO export of every committed part; return the files written (relative to the output).

        Up to ``shard_images`` ok images: one ``coco.json``. More: ``coco/part-<n>.json`` shards of at most
        ``shard_images`` images each, every one a COCO document of its own (all categories; image ids unique
        across shards). Memory holds one shard's rows. The export of the other form, or shards beyond the new
        count left by an earlier export, are removed so that what is there is one export of one state.
        """
        ok_images = self.status_counts()[0][STATUS_OK]
        single = ok_images <= shard_images
        count = max(1, math.ceil(ok_images / shard_images))
        names = [COCO_FILE] if single else [join(COCO_DIR, f"part-{n:05d}.json") for n in range(count)]
        shards = self._coco_shards(shard_images)  # a generator: one shard's rows in memory at a time
        first_image_id = 1
        for n, name in enumerate(names):
            pieces = next(shards, [])
            shard_info = info if single else {**info, "shard": n, "shards": count}
            with open_for_publish(self.fs, self.path(name), "wt") as out:
                counts = write_coco(out, (images for images, _ in pieces), (annotations for _, annotations in pieces),
                                    label_names, shard_info, first_image_id)
            first_image_id += counts.images
        stale = [] if single else [self.path(COCO_FILE)]
        if self.fs.exists(self.path(COCO_DIR)):
            stale += [p for p in self.fs.find(self.path(COCO_DIR)) if p not in {self.path(n) for n in names}]
        for path in stale:
            if self.fs.exists(path):
                self.fs.rm(path)
        return names

    def _coco_shards(self, shard_images: int):
        """Lists of (images, annotations) tables holding at most ``shard_images`` ok images each, part by part."""
        shard, room = [], shard_images
        for part_id in self.tables.part_ids():
            images = self.read_table(IMAGES_DIR, [part_id])
            images = images.filter(pc.equal(images.column("status"), STATUS_OK))
            annotations = self.read_table(ANNOTATIONS_DIR, [part_id])
            while images.num_rows:
                piece, images = images.slice(0, room), images.slice(room)
                mine = pc.is_in(annotations.column("image_uri"), value_set=piece.column("image_uri"))
                shard.append((piece, annotations.filter(mine)))
                room -= piece.num_rows
                if room == 0:
                    yield shard
                    shard, room = [], shard_images
        if shard:
            yield shard

    def _staged(self, part_id: str, table: str) -> str:
        return self.path(STAGING_DIR, part_id, _STAGED[table])

    def _publish(self, part_id: str) -> None:
        """Steps 3-5 of the commit protocol; idempotent, so that recovery can repeat them after a kill."""
        for table in (ANNOTATIONS_DIR, IMAGES_DIR):
            staged = self._staged(part_id, table)
            if self.fs.exists(staged):
                target = self.path(part_file(table, part_id))
                if is_local(self.fs):  # object stores have no folders (s3fs would create a missing bucket)
                    self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                self.fs.mv(staged, target)  # a rename locally; copy + delete on object stores
        self._remove_staging(part_id)

    def _remove_staging(self, part_id: str) -> None:
        folder = self.path(STAGING_DIR, part_id)
        for leftover in self.fs.find(folder, withdirs=False):  # a staged file, or a local temp file
            self.fs.rm(leftover)
        if is_local(self.fs) and self.fs.exists(folder):
            self.fs.rmdir(folder)

    # --- reading / resume ---------------------------------------------------------------------------

    def read_run_record(self) -> dict | None:
        if not self.fs.exists(self.path(RUN_FILE)):
            return None
        return json.loads(self.fs.cat_file(self.path(RUN_FILE)))

    def committed_parts(self) -> list[str]:
        """Ids of the committed parts, sorted."""
        return self.tables.part_ids()

    def recover(self) -> Recovery:
        """Finish or undo what an interrupted run left under ``_staging/`` (see the commit protocol)."""
        staging = self.path(STAGING_DIR)
        self.fs.invalidate_cache(staging)
        if not self.fs.exists(staging):
            return Recovery(0, 0)
        part_ids = sorted({posixpath.relpath(p, staging).split("/", 1)[0]
                           for p in self.fs.find(staging, withdirs=False)})
        forward = [i for i in part_ids if self.fs.exists(self._staged(i, IMAGES_DIR))
                   or self.fs.exists(self.path(part_file(IMAGES_DIR, i)))]
        for part_id in part_ids:
            self._publish(part_id) if part_id in forward else self._remove_staging(part_id)
        if is_local(self.fs):
            for folder in self.fs.ls(staging, detail=False):
                self.fs.rmdir(folder)  # folders emptied above (object stores have no folders)
        return Recovery(rolled_forward=len(forward), rolled_back=len(part_ids) - len(forward))

    def status_counts(self) -> tuple[collections.Counter, int]:
        """Over all committed parts: Counter of ``"ok"`` / error kinds per image, and the annotation count."""
        counts: collections.Counter = collections.Counter()
        annotations = 0
        for batch in self._scan(IMAGES_DIR, ["status", "error_kind", "num_annotations"]):
            for status, kind in zip(batch.column("status").to_pylist(), batch.column("error_kind").to_pylist()):
                counts[STATUS_OK if status == STATUS_OK else kind] += 1
            annotations += int(pc.sum(batch.column("num_annotations")).as_py() or 0)
        return counts, annotations

    def read_table(self, kind: str, part_ids: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        """Committed rows of ``kind`` (``"images"`` or ``"annotations"``), of all parts or of ``part_ids``; all
        columns or ``columns``."""
        try:
            return self.tables.read(kind, columns=columns, part_ids=part_ids)
        except SchemaError as err:
            raise OutputError(f"{err}; write to a new --output") from None

    def _scan(self, kind: str, columns: list[str]):
        try:
            yield from self.tables.scan(kind, columns)
        except SchemaError as err:
            raise OutputError(f"{err}; write to a new --output") from None


class Lease:
    """One writing run per output: ``_lease.json`` names the run that holds the output until ``expires_at``.

    `acquire` creates the file with an exclusive create (`create_exclusive`), so of two runs starting together
    exactly one wins and the other gets `OutputError`. A lease past its expiry, or held by a process of this
    machine that no longer exists (a killed run), is stale: it is replaced by this run's with a conditional write
    of the version that was judged stale (`replace_if_unchanged`), so of several runs taking over one stale lease
    at once exactly one wins. While held, a daemon thread renews it every `_RENEW_EVERY_S`, also conditionally:
    a renewal never overwrites the lease of a run that took the output over. `release` stops the renewal and
    removes the file if it is still this run's.
    """

    def __init__(self, store: OutputStore):
        self.store = store
        self.path = store.path(LEASE_FILE)
        self.holder = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": _utc(time.time())}
        self._version: str | None = None  # of the lease this run last wrote
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> dict | None:
        """Take the output for this run; return the stale lease taken over (None if there was none).

        Raises `OutputError` if another run holds it; storage errors (missing bucket, read-only) propagate.
        """
        _HELD_HERE.add(self.holder["run_id"])  # before the first write: a lease naming us is never stale
        try:
            stale = self._take()
        except BaseException:
            _HELD_HERE.discard(self.holder["run_id"])
            raise
        self._renewer = threading.Thread(target=self._renew, name="ovsam-lease", daemon=True)
        self._renewer.start()
        return stale

    def _take(self) -> dict | None:
        fs = self.store.fs
        replaced = None  # the stale lease this run tried to replace
        for _ in range(_TAKE_TRIES):
            try:
                self._version = create_exclusive(fs, self.path, self._body())
                return None
            except FileExistsError:
                pass
            try:
                data, version = read_versioned(fs, self.path)
            except FileNotFoundError:
                continue  # released in the meantime: create it again
            lease = _parse_lease(data)
            if lease.get("run_id") == self.holder["run_id"]:
                self._version = version  # ours: a conditional PUT succeeded, its answer was lost, it was sent again
                return replaced
            if not _is_stale(lease):
                raise self._held_by(lease)
            replaced = lease
            self._version = replace_if_unchanged(fs, self.path, version, self._body())
            if self._version is not None:
                return lease
            # Replaced or removed since it was read (another run took it over, or ours was sent twice): look again.
        raise self._held_by(self.read() or {})

    def read(self) -> dict | None:
        """The lease in the output, None if there is none; an unreadable one counts as expired."""
        try:
            return _parse_lease(self.store.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this run's."""
        self._stop.set()
        _HELD_HERE.discard(self.holder["run_id"])
        if self._renewer is not None:
            self._renewer.join()
        current = self.read()
        if current is not None and current.get("run_id") == self.holder["run_id"]:
            self.store.fs.rm(self.path)

    def _body(self) -> bytes:
        expires = time.time() + LEASE_SECONDS
        return json.dumps({**self.holder, "expires_at": expires, "expires": _utc(expires)}, indent=2).encode()

    def renew(self) -> bool:
        """Extend this run's lease by `LEASE_SECONDS`; False (and nothing written) if another run took it over."""
        version = replace_if_unchanged(self.store.fs, self.path, self._version, self._body())
        if version is None:  # not the version we wrote: ours sent twice (its answer lost), or taken over
            data, version = read_versioned(self.store.fs, self.path)
            if _parse_lease(data).get("run_id") != self.holder["run_id"]:
                return False
        self._version = version
        return True

    def _renew(self) -> None:
        log = logging.getLogger(__name__)
        while not self._stop.wait(_RENEW_EVERY_S):
            try:
                if not self.renew():
                    log.error("the lease %s was taken over by another run", redact_uri(self.store.url(LEASE_FILE)))
                    return
            except Exception as err:  # noqa: BLE001 - the next renewal tries again; the lease outlasts several
                log.warning("could not renew the lease %s: %s", redact_uri(self.store.url(LEASE_FILE)),
                            error_reason(err))

    def _held_by(self, lease: dict) -> OutputError:
        return OutputError(
            f"another label run (host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, started "
            f"{lease.get('started_at', '?')}) is writing into {redact_uri(self.store.output)}: its lease "
            f"{LEASE_FILE} holds the output until {lease.get('expires', '?')}; wait for that run to finish (or, if "
            "it crashed on another machine, for the lease to expire)")


def _parse_lease(data: bytes) -> dict:
    """A lease file's content; an unreadable one counts as expired."""
    try:
        lease = json.loads(data)
    except ValueError:
        return {"expires_at": 0.0}
    return lease if isinstance(lease, dict) else {"expires_at": 0.0}


def _is_stale(lease: dict) -> bool:
    if float(lease.get("expires_at", 0.0)) < time.time():
        return True
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        if lease["pid"] == os.getpid():
            return lease.get("run_id") not in _HELD_HERE
        try:
            os.kill(lease["pid"], 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # exists, owned by another user
    return False


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({**table.schema.metadata, RUN_METADATA_KEY: json.dumps(metadata).encode()})


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class PartLimits:
    """When a writer publishes its buffered rows as a part: at ``images`` images, at ``bytes`` of buffered Arrow
    data (the part's size in memory; the Parquet file is smaller), or when its oldest row has waited
    ``seconds`` (so that a kill loses at most about that much of each writer's work)."""

    images: int
    bytes: int
    seconds: float


class PartWriter:
    """Accumulates result rows across model batches and publishes them as parts (a plain Ray actor).

    Several Ray Data tasks feed one writer (`SendToWriter`); the driver calls `flush` once the dataset is
    consumed, because Ray Data has no end-of-stream call per actor. Rows are only committed once published:
    a writer killed with rows in its buffer loses them, and the next run labels those images again.
    """

    def __init__(self, output: str, endpoint_url: str | None, storage_attempts: int, metadata: dict,
                 limits: PartLimits):
        self.store = OutputStore(output, endpoint_url, storage_attempts)
        self.metadata = metadata
        self.limits = limits
        self._images: list[pa.Table] = []
        self._annotations: list[pa.Table] = []
        self._rows = self._bytes = 0
        self._oldest = 0.0

    def add(self, images: pa.Table, annotations: pa.Table) -> None:
        """Buffer one batch's images rows and their annotations rows; publish a part if a limit is reached."""
        if not self._rows:
            self._oldest = time.monotonic()
        self._images.append(images)
        self._annotations.append(annotations)
        self._rows += images.num_rows
        self._bytes += images.nbytes + annotations.nbytes
        if (self._rows >= self.limits.images or self._bytes >= self.limits.bytes
                or time.monotonic() - self._oldest >= self.limits.seconds):
            self.flush()

    def flush(self) -> int:
        """Publish the buffered rows as one part (nothing when empty); return the number of images published.

        Raises `WriteFailed` when the storage fails after its retries: the run stops, the part stays uncommitted,
        and the next run rolls it back and labels its images again.
        """
        if not self._rows:
            return 0
        images = pa.concat_tables(self._images)
        annotations = pa.concat_tables(self._annotations)
        try:
            self.store.write_part(images, annotations, self.metadata)
        except Exception as err:  # noqa: BLE001 - any storage failure stops the run with this one sentence
            raise WriteFailed(f"could not write to the output {redact_uri(self.store.output)}: "
                              f"{error_reason(err)}" + (RETRY_HINT if is_transient(err) else "")) from None
        self._images, self._annotations, self._rows, self._bytes = [], [], 0, 0
        return images.num_rows


class SendToWriter:
    """Ray Data stage: a batch of `LabelImages` result rows → Arrow tables handed to a `PartWriter` → one summary row.

    Batches go to the writers in turn; each call waits until its writer has buffered the rows, so a slow
    writer slows the stream instead of piling up rows. Rows of kind `DEFERRED` (a transient read fault outlasted
    the retries) are not written: those images stay without a row for the next run. Summary columns: ``images``
    (rows written), ``ok``, ``annotations``, ``deferred`` (counts), ``error_kinds`` (JSON object kind → count) and
    ``write_error`` (the writer's `WriteFailed` message when it could not write the rows, else empty: the driver
    then stops the run).
    """

    def __init__(self, writers: list):
        self.writers = writers
        self._next = random.randrange(len(writers))  # senders start at different writers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        deferred = batch["error_kind"] == DEFERRED
        if deferred.any():
            batch = {name: column[~deferred] for name, column in batch.items()}
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
        writer = self.writers[self._next]
        self._next = (self._next + 1) % len(self.writers)
        try:
            ray.get(writer.add.remote(validate(images, IMAGES_SCHEMA), annotations))
        except WriteFailed as err:
            # Handed to the driver as data: Ray Data would log the worker's traceback and drop the cause.
            return {"images": np.array([0]), "ok": np.array([0]), "annotations": np.array([0]),
                    "deferred": np.array([0]), "error_kinds": np.array(["{}"]),
                    "write_error": np.array([str(getattr(err, "cause", None) or err)])}
        kinds = collections.Counter(kind for kind, good in zip(batch["error_kind"], ok) if not good)
        return {"images": np.array([len(ok)]), "ok": np.array([int(ok.sum())]),
                "annotations": np.array([annotations.num_rows]), "deferred": np.array([int(deferred.sum())]),
                "error_kinds": np.array([json.dumps(kinds)]), "write_error": np.array([""])}
