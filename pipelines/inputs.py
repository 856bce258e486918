"""The inputs of a labelling run as a Ray dataset, listed and read by Ray Data on the cluster, never on the driver.

`describe_input` classifies INPUT with a few storage requests on the driver; `work_dataset` builds what the
workers label: one row per image not yet in the output. Sources:

* a folder or prefix: listed recursively by a Ray read task that yields the listing a block at a time as it
  arrives (S3: 1,000 keys a LIST request), so the first images are labelled while the listing goes on. Files
  without an image suffix are counted, not labelled.
* a glob: its folder (the part before the first wildcard) listed the same way; every match is an input.
* a manifest: Parquet (`ray.data.read_parquet`, in parallel over files and row groups), CSV (`ray.data.read_csv`)
  or text (`ray.data.read_text`, one URI or path a line). CSV and Parquet manifests name the image in a ``uri``
  column and may carry box prompts (`BOX_COLUMNS`).
* one image file.

Which images a run labels is decided by one hash shuffle keyed by ``image_uri`` (Ray Data's ``groupby``), run
whenever an image can appear more than once: a manifest (the same URI on two lines is one image; box rows of
one image are gathered) or an output that already holds images (those rows join the shuffle and their images
drop out: the resume check holds no URI set in any single process). A fresh folder or glob lists each object
once, so it streams straight into the labelling.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import posixpath
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ovsam.errors import PromptError
from ovsam.images import IMAGE_SUFFIXES
from ovsam.redaction import redact_uri
from pipelines.storage import GLOB_CHARS, error_reason, is_local, is_transient, open_fs, RETRY_HINT

URI_COLUMN = "uri"
BOXES_COLUMN = "boxes"
CORNER_COLUMNS = ("x0", "y0", "x1", "y1")
BOX_COLUMNS = (BOXES_COLUMN, *CORNER_COLUMNS)
INVALID_MANIFEST_BOX = PromptError.INVALID  # the error kind of an image whose manifest boxes are malformed
NO_URI = "no_uri"  # the error kind of a CSV/Parquet manifest row that names no image
# Entries per block of a streamed listing: one S3 LIST page is 1,000 keys; ten pages a block keep the blocks few
# (10^8 objects are 10^4 blocks) and the first block quick to arrive.
LISTING_BLOCK_ROWS = 10_000
_TEXT_COLUMN = "text"  # the column `ray.data.read_text` gives a text manifest's lines in

# The rows every source yields: `source_uri` (what is fetched, credentials included), `image_uri` (its redacted
# form: what is stored), `prompt_boxes` (float32 x0, y0, x1, y1 bytes of the row's boxes, empty when it has none),
# `entry_error_kind` / `entry_error` (the manifest row is malformed: `INVALID_MANIFEST_BOX`, `NO_URI`, and why; else
# null), `done` (1 for an image an earlier run committed) and `ignored` (1 for a listed file without an image suffix).
ROW_SCHEMA = pa.schema([("source_uri", pa.string()), ("image_uri", pa.string()), ("prompt_boxes", pa.binary()),
                        ("entry_error_kind", pa.string()), ("entry_error", pa.string()), ("done", pa.int8()),
                        ("ignored", pa.int8())])


class InputError(Exception):
    """The input cannot be listed or read, or a manifest is malformed; the message says why in one sentence."""


@dataclasses.dataclass(frozen=True)
class InputSource:
    """What INPUT is (``kind``: ``folder``, ``glob``, ``image``, ``text``, ``csv`` or ``parquet``), found by
    `describe_input`. ``path``: the file or folder in its filesystem; ``root_uri``: the folder that names are
    relative to (what a prompts file may call an image); ``pattern``: a glob's regular expression;
    ``box_columns``: the box columns of a CSV/Parquet manifest (empty: it has none)."""

    spec: str
    kind: str
    path: str
    root_uri: str
    endpoint_url: str | None
    attempts: int
    pattern: str | None = None
    box_columns: tuple[str, ...] = ()

    @property
    def is_manifest(self) -> bool:
        return self.kind in ("text", "csv", "parquet")

    def fs(self) -> fsspec.AbstractFileSystem:
        return open_fs(self.spec, self.endpoint_url, self.attempts)[0]


def describe_input(spec: str, endpoint_url: str | None, attempts: int) -> InputSource:
    """Classify ``spec`` (a folder/prefix, a glob, one image, or a manifest by its suffix: ``.parquet``, ``.csv``,
    anything else is text) with a few requests; a CSV/Parquet manifest's columns are read from its header/footer.

    Raises FileNotFoundError when ``spec`` names nothing, `InputError` for a manifest without a ``uri`` column
    or with box columns that do not make one form.
    """
    fs, path = open_fs(spec, endpoint_url, attempts)
    if is_local(fs):
        path = posixpath.normpath(path)  # one image, one URI: no `..` or `.` segments
    make = functools.partial(InputSource, spec=spec, endpoint_url=endpoint_url, attempts=attempts)
    if GLOB_CHARS.search(path):
        root = GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        return make(kind="glob", path=root, root_uri=fs.unstrip_protocol(root),
                    pattern=fsspec.utils.glob_translate(path))
    if fs.isdir(path):
        return make(kind="folder", path=path.rstrip("/"), root_uri=fs.unstrip_protocol(path.rstrip("/")))
    if not fs.exists(path):
        raise FileNotFoundError(f"input {redact_uri(spec)} does not exist")
    folder = fs.unstrip_protocol(posixpath.dirname(path))
    lower = path.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return make(kind="image", path=path, root_uri=folder)
    if not lower.endswith((".csv", ".parquet")):
        return make(kind="text", path=path, root_uri=folder)
    kind = "csv" if lower.endswith(".csv") else "parquet"
    columns = _manifest_columns(fs, path, kind)
    shown = redact_uri(spec)
    if URI_COLUMN not in columns:
        raise InputError(f"manifest {shown} has no {URI_COLUMN!r} column (its columns: {', '.join(columns) or 'none'})")
    corners = [name for name in CORNER_COLUMNS if name in columns]
    if corners and len(corners) != len(CORNER_COLUMNS):
        raise InputError(f"manifest {shown} has box columns {', '.join(corners)} but not all of "
                         f"{', '.join(CORNER_COLUMNS)}")
    if corners and BOXES_COLUMN in columns:
        raise InputError(f"manifest {shown} has both a {BOXES_COLUMN!r} column and {', '.join(CORNER_COLUMNS)} "
                         "columns: give the boxes one way")
    box_columns = (BOXES_COLUMN,) if BOXES_COLUMN in columns else tuple(corners)
    return make(kind=kind, path=path, root_uri=folder, box_columns=box_columns)


def _manifest_columns(fs: fsspec.AbstractFileSystem, path: str, kind: str) -> list[str]:
    """Column names of a CSV manifest's header line or a Parquet manifest's footer (one or two requests)."""
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            with fs.open(path, "rb") as source:
                return list(pq.read_schema(source).names)
        with fs.open(path, "rt", newline="") as source:
            return [name.strip() for name in next(csv.reader(source), [])]
    except (pa.ArrowInvalid, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"manifest {redact_uri(fs.unstrip_protocol(path))} is not a readable {kind.upper()} file: "
                         f"{err}") from None


class InputTally:
    """Ray actor: what the admission stage saw (`Admit`): inputs listed, inputs already in the output, files
    without an image suffix, and the prompt-file names that matched an input."""

    def __init__(self):
        self.counts = collections.Counter()
        self.matched: set[str] = set()

    def add(self, counts: dict, matched: list[str]) -> None:
        self.counts.update(counts)
        self.matched.update(matched)

    def result(self) -> tuple[dict, int]:
        """(counts, number of distinct prompt names matched)."""
        return dict(self.counts), len(self.matched)


@dataclasses.dataclass(frozen=True)
class Work:
    """The images a run labels (``dataset``: the rows of `Admit`) and, when a shuffle decided them before labelling
    (`work_dataset`), how many there are."""

    dataset: object  # ray.data.Dataset
    todo: int | None  # None: streamed, known at the end


def work_dataset(source: InputSource, *, box_mode: bool, done_parts: list[str], output: str, prompts_ref,
                 tally, limit: int | None, partitions: int) -> Work:
    """The run's images: every input that the output does not hold yet, once, with its boxes in box mode.

    ``done_parts``: the output's committed part ids (their images rows join the shuffle, see the module doc);
    ``prompts_ref``: object-store reference of a prompts file's boxes by name (`pipelines.prompts`), or None;
    ``tally``: an `InputTally` actor; ``limit``: label at most this many images; ``partitions``: of the shuffle.
    Raises `InputError` when a manifest cannot be read, `pipelines.output.OutputError` when the output's committed
    images cannot (a streamed listing's errors come later, from the labelling stream, as `InputError` via Ray).
    """
    from ray.data.aggregate import AsList, Max, Min

    rows = _source_rows(source)
    grouped = source.is_manifest or bool(done_parts)
    key_root = source.root_uri
    if grouped:
        if done_parts:
            done = ray.data.from_items([{"part_id": part} for part in done_parts],
                                       override_num_blocks=min(len(done_parts), partitions))
            done = done.map_batches(_done_rows, fn_kwargs={"output": output, "endpoint_url": source.endpoint_url,
                                                           "attempts": source.attempts},
                                    batch_size=1, batch_format="pyarrow")
            rows = rows.union(done)
        boxes = [AsList("prompt_boxes", alias_name="prompt_boxes")] if source.box_columns else []  # rows gathered
        rows = rows.groupby("image_uri", num_partitions=partitions).aggregate(
            Min("source_uri", alias_name="source_uri"), Max("entry_error_kind", alias_name="entry_error_kind"),
            Max("entry_error", alias_name="entry_error"),
            Max("done", alias_name="done"), Max("ignored", alias_name="ignored"), *boxes)
        if source.is_manifest and prompts_ref is not None:
            # Names in a prompts file are relative to the folder that all of a manifest's entries share: the common
            # prefix of the smallest and largest URI is that of all of them.
            rows = _materialize(rows, source)
            low, high = rows.min("source_uri"), rows.max("source_uri")
            key_root = posixpath.commonprefix([low or "", high or ""]).rsplit("/", 1)[0]
    admitted = rows.map_batches(
        Admit, fn_constructor_kwargs={"box_mode": box_mode, "prompts_ref": prompts_ref, "key_root": key_root,
                                      "tally": tally},
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, partitions)),
        num_cpus=0)
    todo = None
    if grouped:
        admitted = _materialize(admitted, source)
        todo = admitted.count()
    if limit is not None:
        admitted = admitted.limit(limit)
        todo = None if todo is None else min(todo, limit)
    return Work(admitted, todo)


def _materialize(dataset, source: InputSource):
    """``dataset`` executed into the object store; a manifest that cannot be read (its storage, or its content
    mid-file) is an `InputError` sentence rather than a Ray traceback."""
    from pipelines.output import OutputError

    try:
        return dataset.materialize()
    except Exception as err:  # noqa: BLE001 - Ray wraps the reader's error: find it, say it in one sentence
        cause, seen = err, set()
        while not isinstance(cause, (InputError, OutputError)) and id(cause) not in seen:
            seen.add(id(cause))  # a Ray task error keeps the worker's error in `cause`
            inner = getattr(cause, "cause", None) or cause.__cause__
            if inner is None:
                break
            cause = inner
        if isinstance(cause, (InputError, OutputError)):
            raise cause from None
        raise InputError(f"cannot read the input {redact_uri(source.spec)}: {error_reason(cause)}"
                         + (RETRY_HINT if is_transient(cause) else "")) from None


def _source_rows(source: InputSource):
    """The lazy dataset of `ROW_SCHEMA` rows the input's entries make, one per entry (before grouping)."""
    import pyarrow.csv as pacsv

    if source.kind in ("folder", "glob"):
        # No CPU reserved: the listing waits on the store, and it streams while the decode and model actors, which
        # hold the cluster's CPUs from the start, are running (a task asking for a CPU would never be scheduled).
        return ray.data.read_datasource(_ListingDatasource(source), num_cpus=0)
    if source.kind == "image":
        uri = source.fs().unstrip_protocol(source.path)
        return ray.data.from_arrow(_rows([uri]))
    fs = source.fs()
    filesystem = None if is_local(fs) else pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))
    if source.kind == "text":
        raw = ray.data.read_text(source.path, filesystem=filesystem, file_extensions=None)
    elif source.kind == "csv":
        names = [URI_COLUMN, *source.box_columns]
        raw = ray.data.read_csv(
            source.path, filesystem=filesystem, file_extensions=None,
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in names},
                                                 include_columns=names, strings_can_be_null=True))
    else:
        raw = ray.data.read_parquet(source.path, filesystem=filesystem, file_extensions=None,
                                    columns=[URI_COLUMN, *source.box_columns])
    return raw.map_batches(_manifest_rows, fn_kwargs={"source": source}, batch_format="pyarrow", batch_size=None)


def _rows(uris: list[str], boxes: list | None = None, kinds: list | None = None, errors: list | None = None,
          ignored: list | None = None) -> pa.Table:
    count = len(uris)
    return pa.table({"source_uri": uris, "image_uri": [redact_uri(uri) for uri in uris],
                     "prompt_boxes": pa.array(boxes or [b""] * count, pa.binary()),
                     "entry_error_kind": pa.array(kinds or [None] * count, pa.string()),
                     "entry_error": pa.array(errors or [None] * count, pa.string()),
                     "done": pa.array(np.zeros(count, np.int8)),
                     "ignored": pa.array(np.asarray(ignored or [0] * count, np.int8))}, schema=ROW_SCHEMA)


# --- manifests -------------------------------------------------------------------------------------------------


def _manifest_rows(batch: pa.Table, source: InputSource) -> pa.Table:
    """A block of manifest entries → `ROW_SCHEMA` rows (the image's URI resolved, its boxes packed)."""
    fs, base = source.fs(), posixpath.dirname(source.path)
    if source.kind == "text":
        uris = [_resolve(fs, base, line.strip()) for line in batch.column(_TEXT_COLUMN).to_pylist()
                if line.strip() and not line.strip().startswith("#")]
        return _rows(uris)
    uris, boxes, kinds, errors = [], [], [], []
    shown = redact_uri(source.spec)
    raw_uris = batch.column(URI_COLUMN).to_pylist()
    box_values = ([batch.column(BOXES_COLUMN).to_pylist()] if source.box_columns == (BOXES_COLUMN,)
                  else [batch.column(name).to_pylist() for name in source.box_columns])
    for index, raw in enumerate(raw_uris):
        boxes.append(b"")
        kinds.append(None)
        errors.append(None)
        if raw is None or not str(raw).strip():
            # No image to name the error row after: the row is, by its content (the same row twice is one row).
            row = {name: values[index] for name, values in zip(source.box_columns, box_values)}
            digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]
            uris.append(f"{source.fs().unstrip_protocol(source.path)}#row-without-uri-{digest}")
            kinds[-1], errors[-1] = NO_URI, (f"manifest {shown} has a row without a {URI_COLUMN!r}"
                                             + (f" (its boxes: {row})" if row else "") + ": every row must name its image")
            continue
        uris.append(_resolve(fs, base, str(raw).strip()))
        if not source.box_columns:
            continue
        try:
            if source.box_columns == (BOXES_COLUMN,):
                parsed = _boxes_value(box_values[0][index], source.kind)
            else:
                parsed = _corner_values([values[index] for values in box_values])
            boxes[-1] = parsed.tobytes()
        except ValueError as err:
            kinds[-1], errors[-1] = INVALID_MANIFEST_BOX, f"manifest {shown}: {err}"
    return _rows(uris, boxes, kinds, errors)


def _resolve(fs: fsspec.AbstractFileSystem, base: str, entry: str) -> str:
    """A manifest entry as a URI: absolute URIs as given, paths relative to the manifest's folder, local paths
    normalised (no ``..``), so that one image has one URI (and one annotation id) whichever manifest lists it."""
    if entry.startswith("file://"):
        local, local_path = fsspec.core.url_to_fs(entry)
        return local.unstrip_protocol(posixpath.normpath(local_path))
    if "://" in entry:
        return entry  # an object key may hold `..` literally; only paths are normalised
    return fs.unstrip_protocol(posixpath.normpath(entry if entry.startswith("/") else posixpath.join(base, entry)))


def _boxes_value(value, kind: str) -> np.ndarray:
    """A ``boxes`` cell (a list of [x0, y0, x1, y1]; JSON text in CSV) → [N, 4] float32; empty when null."""
    if value is None or (kind == "csv" and not value.strip()):
        return np.zeros((0, 4), np.float32)
    if kind == "csv":
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"boxes {value[:80]!r} are not JSON (write them as [[x0, y0, x1, y1], ...])") from None
    try:
        boxes = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):  # ragged, or not numbers
        boxes = None
    if boxes is not None and boxes.size == 0:  # [] : the image has no box
        return np.zeros((0, 4), np.float32)
    if boxes is None or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes {str(value)[:80]} are not a list of [x0, y0, x1, y1] (4 numbers each)")
    return boxes


def _corner_values(values: list) -> np.ndarray:
    """One row's x0, y0, x1, y1 cells → [1, 4] float32, or [0, 4] when all four are empty (a row naming an image
    without a box)."""
    present = [value for value in values if value is not None and str(value).strip()]
    if not present:
        return np.zeros((0, 4), np.float32)
    try:
        if len(present) != len(values):
            raise ValueError
        return np.array([[float(value) for value in values]], np.float32)
    except ValueError:
        raise ValueError(f"box {dict(zip(CORNER_COLUMNS, values))} is not 4 numbers "
                         f"{', '.join(CORNER_COLUMNS)}") from None


# --- folders and globs -----------------------------------------------------------------------------------------


class _ListingDatasource(Datasource):
    """Ray Data datasource listing a folder/prefix (or a glob's folder) recursively: one read task that yields the
    listing a block at a time as it arrives, so that labelling starts with the first block."""

    def __init__(self, source: InputSource):
        super().__init__()
        self.source = source

    def get_name(self) -> str:
        return "ListInputs"

    def estimate_inmemory_data_size(self) -> None:
        return None  # unknown until listed

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(functools.partial(_list_folder, self.source), metadata, schema=ROW_SCHEMA,
                         per_task_row_limit=per_task_row_limit)]


def _list_folder(source: InputSource):
    """Read task: `ROW_SCHEMA` blocks of the files under the source's folder, streamed."""
    fs = source.fs()
    pattern = re.compile(source.pattern) if source.pattern else None
    try:
        for page in _walk(fs, source.path):
            yield _listed_rows(fs, page, pattern)
    except Exception as err:  # noqa: BLE001 - one sentence for the user, raised to the driver through Ray
        raise InputError(_listing_problem(source, err)) from None


def _listed_rows(fs: fsspec.AbstractFileSystem, paths: list[str], pattern: re.Pattern | None) -> pa.Table:
    """A glob keeps its matches; a folder keeps image files and marks the others ``ignored``."""
    if pattern is not None:
        paths = [path for path in paths if pattern.match(path)]
        return _rows([fs.unstrip_protocol(path) for path in paths])
    return _rows([fs.unstrip_protocol(path) for path in paths],
                 ignored=[0 if path.lower().endswith(IMAGE_SUFFIXES) else 1 for path in paths])


def _walk(fs: fsspec.AbstractFileSystem, folder: str):
    """Pages of at most `LISTING_BLOCK_ROWS` file paths under ``folder``, recursively, as the listing arrives.

    S3: one listing without delimiter (keys in order, 1,000 a request, each request retried by s3fs/botocore).
    Local: ``os.walk`` in name order. Other filesystems: fsspec's ``walk``, a folder at a time.
    """
    page: list[str] = []
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(folder)
        entries = fs._iterdir(bucket, prefix=key.rstrip("/") + "/" if key else "", delimiter="")
        while True:
            chunk = fsspec.asyn.sync(fs.loop, _take, entries, LISTING_BLOCK_ROWS)
            names = [entry["name"] for entry in chunk if entry["type"] == "file" and not entry["name"].endswith("/")]
            if names:
                yield names
            if len(chunk) < LISTING_BLOCK_ROWS:
                return
    walker = os.walk(folder) if is_local(fs) else fs.walk(folder)
    for directory, subfolders, names in walker:
        subfolders.sort()  # os.walk descends in this order
        for name in sorted(names):
            page.append(posixpath.join(directory, name))
            if len(page) >= LISTING_BLOCK_ROWS:
                yield page
                page = []
    if page:
        yield page


async def _take(entries, count: int) -> list:
    """Up to ``count`` items of the async iterator ``entries``."""
    out = []
    try:
        while len(out) < count:
            out.append(await entries.__anext__())
    except StopAsyncIteration:
        pass
    return out


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _listing_problem(source: InputSource, err: BaseException) -> str:
    return (f"cannot list the input {redact_uri(source.spec)}: {error_reason(err)}"
            + (RETRY_HINT if is_transient(err) else ""))


# --- resume and admission --------------------------------------------------------------------------------------


def _done_rows(batch: pa.Table, output: str, endpoint_url: str | None, attempts: int) -> pa.Table:
    """The ``image_uri`` of a committed part's images rows as `ROW_SCHEMA` rows with ``done`` = 1."""
    from pipelines.output import OutputError, OutputStore
    from schemas.tables import IMAGES_DIR

    store = OutputStore(output, endpoint_url, attempts)
    try:
        uris = store.read_table(IMAGES_DIR, part_ids=batch.column("part_id").to_pylist(),
                                columns=["image_uri"]).column("image_uri")
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - one sentence for the user, raised to the driver through Ray
        raise OutputError(f"cannot read the committed images of {redact_uri(output)}: {error_reason(err)}"
                          + (RETRY_HINT if is_transient(err) else "")) from None
    count = len(uris)
    return pa.table({"source_uri": pa.nulls(count, pa.string()), "image_uri": uris,
                     "prompt_boxes": pa.array([b""] * count, pa.binary()),
                     "entry_error_kind": pa.nulls(count, pa.string()), "entry_error": pa.nulls(count, pa.string()),
                     "done": pa.array(np.ones(count, np.int8)), "ignored": pa.array(np.zeros(count, np.int8))},
                    schema=ROW_SCHEMA)


class Admit:
    """Ray Data stage (actors): input rows (one per entry, or one per image after the shuffle) → the images to label:
    ``source_uri``, ``image_uri``, ``entry_error_kind`` / ``entry_error`` (empty unless the manifest row is malformed)
    and, in box mode, ``prompt_boxes``.

    Drops images already in the output and files without an image suffix, counting both in the `InputTally`. In
    box mode, gives each image its boxes as one ``prompt_boxes`` value (float32 x0, y0, x1, y1 bytes, empty for
    none): the manifest's rows gathered, or the prompts file's boxes for its URI or its name relative to
    ``key_root``.
    """

    def __init__(self, box_mode: bool, prompts_ref, key_root: str, tally):
        self.box_mode = box_mode
        self.prompts = ray.get(prompts_ref) if prompts_ref is not None else None
        self.key_root = key_root.rstrip("/") + "/"
        self.tally = tally

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        listed = pc.and_(pc.is_valid(batch.column("source_uri")), pc.equal(batch.column("ignored"), 0))
        done = pc.and_(listed, pc.equal(batch.column("done"), 1))
        counts = {"listed": pc.sum(listed).as_py() or 0, "skipped_done": pc.sum(done).as_py() or 0,
                  "ignored": pc.sum(batch.column("ignored")).as_py() or 0}
        todo = batch.filter(pc.and_(listed, pc.invert(done)))
        matched: list[str] = []
        # A shuffle partition whose values are all null gives its aggregates Arrow's null type: cast back.
        text = {name: todo.column(name).cast(pa.string())
                for name in ("source_uri", "image_uri", "entry_error_kind", "entry_error")}
        columns = {"source_uri": text["source_uri"], "image_uri": text["image_uri"],
                   "entry_error_kind": pc.fill_null(text["entry_error_kind"], ""),
                   "entry_error": pc.fill_null(text["entry_error"], "")}
        if self.box_mode:
            if self.prompts is not None:
                boxes = []
                for uri in todo.column("source_uri").to_pylist():
                    key = uri[len(self.key_root):] if uri.startswith(self.key_root) else uri
                    name = uri if uri in self.prompts else key
                    found = self.prompts.get(name)
                    if found is not None:
                        matched.append(name)
                    boxes.append(b"" if found is None else found.astype(np.float32).tobytes())
            else:
                boxes = [b"".join(value) if isinstance(value, list) else value  # a manifest's rows of one image
                         for value in todo.column("prompt_boxes").to_pylist()]
            columns["prompt_boxes"] = pa.array(boxes, pa.binary())
        ray.get(self.tally.add.remote(counts, matched))
        return pa.table(columns)


def shuffle_partitions(cluster_cpus: float) -> int:
    """Partitions of the admission shuffle: one per CPU of the cluster (each is one reduce task's share)."""
    return max(1, math.floor(cluster_cpus))
