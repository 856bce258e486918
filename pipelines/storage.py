"""Storage through fsspec: resolving URLs, listing inputs, atomic publishing, keeping secrets out of output.

Local paths, ``file://``, ``s3://`` and any other fsspec protocol work alike. S3 uses the standard AWS
credential chain (environment, config files, instance roles), and the endpoint is, in order: the
``--endpoint-url`` option, the ``AWS_ENDPOINT_URL`` environment variable (s3fs reads it), AWS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ovsam.images import IMAGE_SUFFIXES
from ovsam.redaction import redact_uri

_GLOB_CHARS = re.compile(r"[*?\[]")


def storage_options(url: str, endpoint_url: str | None) -> dict:
    """fsspec keyword arguments for ``url``: the S3 endpoint override for ``s3://`` / ``s3a://`` URLs."""
    if endpoint_url and urllib.parse.urlsplit(url).scheme in ("s3", "s3a"):
        return {"endpoint_url": endpoint_url}
    return {}


def open_fs(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path inside it (protocol stripped)."""
    return fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(prefix: str, *names: str) -> str:
    return posixpath.join(prefix.rstrip("/"), *names)


@dataclasses.dataclass(frozen=True)
class InputListing:
    """The inputs of a run. ``uris``: sorted, protocol-qualified. ``keys[i]``: the name of ``uris[i]`` relative
    to the input root (what a prompts file calls it). ``ignored``: files in a listed folder without an
    image suffix (counted so that the summary can say so; a glob or manifest ignores nothing)."""

    uris: tuple[str, ...]
    keys: tuple[str, ...]
    ignored: int


def list_inputs(spec: str, endpoint_url: str | None = None) -> InputListing:
    """List ``spec``: a folder/prefix (recursively, image suffixes), a glob, or a manifest file (one URI a line).

    Manifest lines may be absolute URIs or paths relative to the manifest's folder; blank lines and lines
    starting with ``#`` are skipped. Raises FileNotFoundError when ``spec`` names nothing.
    """
    fs, path = open_fs(spec, endpoint_url)
    if _GLOB_CHARS.search(path):
        root = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        paths = [p for p in fs.glob(path) if not fs.isdir(p)]
        return _listing(fs, root, sorted(paths), ignored=0)
    if fs.isdir(path):
        files = sorted(fs.find(path))
        images = [p for p in files if p.lower().endswith(IMAGE_SUFFIXES)]
        return _listing(fs, path, images, ignored=len(files) - len(images))
    if not fs.exists(path):
        raise FileNotFoundError(f"input {redact_uri(spec)} does not exist")
    if path.lower().endswith(IMAGE_SUFFIXES):
        return _listing(fs, posixpath.dirname(path), [path], ignored=0)
    return _manifest(fs, path)


def _listing(fs: fsspec.AbstractFileSystem, root: str, paths: list[str], ignored: int) -> InputListing:
    root = root.rstrip("/")
    keys = tuple(p[len(root) + 1:] if p.startswith(root + "/") else p for p in paths)
    return InputListing(uris=tuple(fs.unstrip_protocol(p) for p in paths), keys=keys, ignored=ignored)


def _manifest(fs: fsspec.AbstractFileSystem, path: str) -> InputListing:
    """The manifest's URIs; a key is the URI relative to the folder all entries share (their input root)."""
    base = posixpath.dirname(path)
    uris: set[str] = set()  # a URI listed twice is one input
    with fs.open(path, "rt") as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "://" in line:
                uris.add(line)
            else:
                uris.add(fs.unstrip_protocol(line if line.startswith("/") else posixpath.join(base, line)))
    ordered = sorted(uris)
    root = posixpath.commonprefix(ordered).rsplit("/", 1)[0] if ordered else ""
    keys = tuple(uri[len(root) + 1:] if root else uri for uri in ordered)
    return InputListing(uris=tuple(ordered), keys=keys, ignored=0)


def publish_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` appear at ``path`` whole or not at all (temp file + rename locally; one PUT on stores)."""
    with open_for_publish(fs, path, "wb") as out:
        out.write(data)


@contextlib.contextmanager
def open_for_publish(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator:
    """A writable file whose content appears at ``path`` only when the block ends without an exception.

    Local: written to a hidden temp name in the same folder, then renamed (atomic on POSIX). Object
    stores: the object becomes visible only when the upload completes; on an exception the upload is
    discarded so nothing half-written is ever visible under ``path``.
    """
    folder = posixpath.dirname(path)
    fs.makedirs(folder, exist_ok=True)
    if is_local(fs):
        temp = join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open(temp, mode) as out:
                yield out
            fs.mv(temp, path)
        finally:
            if fs.exists(temp):
                fs.rm(temp)
        return
    out = fs.open(path, mode)
    try:
        yield out
    except BaseException:
        _discard(out)
        raise
    out.close()


def _discard(out) -> None:
    # fsspec's buffered files abort their multipart upload on discard(); text wrappers hold it in .buffer.
    raw = getattr(out, "buffer", out)
    if hasattr(raw, "discard"):
        raw.discard()
