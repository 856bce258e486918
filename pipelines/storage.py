"""Storage through fsspec: resolving URLs, atomic publishing, keeping secrets out of output (inputs: `pipelines.inputs`).

Local paths, ``file://``, ``s3://`` and any other fsspec protocol work alike. S3 uses the standard AWS
credential chain (environment, config files, instance roles), and the endpoint is, in order: the
``--endpoint-url`` option, the ``AWS_ENDPOINT_URL`` environment variable (s3fs reads it), AWS.

Transient faults (5xx, SlowDown and other throttling, resets, timeouts) are retried by the storage libraries
themselves: botocore's "adaptive" retry mode (exponential backoff with full jitter, plus a client-side rate
limiter that slows down on throttling answers) for each S3 request, and s3fs's own retries for a response cut
off mid-body. `is_transient` tells a fault that outlasted those retries from a permanent answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import http.client
import os
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ovsam.redaction import redact_text, redact_uri

# Characters that make an input a glob pattern (fsspec glob syntax).
GLOB_CHARS = re.compile(r"[*?\[]")


# Attempts per storage request (the first try included) unless --storage-attempts says otherwise. botocore's
# backoff doubles from up to 1 s and is capped at 20 s, so ten attempts ride out about a minute of outage or
# throttling per request before the fault counts as outlasting the budget (and the image is left for the next run).
STORAGE_ATTEMPTS = 10
# botocore retry mode: "adaptive" is "standard" (backoff with full jitter on 5xx, throttling, resets and
# timeouts) plus client-side rate limiting on throttling answers, what AWS advises for SlowDown at scale.
_RETRY_MODE = "adaptive"
# botocore error codes that mean "try again later" (throttling, overload, server-side failure); any other
# 4xx answer (NoSuchKey, AccessDenied, NoSuchBucket...) is permanent.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted", "PriorRequestNotComplete"})
# OSError errnos of network and overload failures (s3fs maps 503/SlowDown to EBUSY and 500 to EREMOTEIO).
_TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EPIPE, errno.EREMOTEIO, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH})
_TOO_MANY_REQUESTS = 429
# Appended to a message about a transient fault that outlasted the retries.
RETRY_HINT = (" (a transient storage fault that outlasted the retries: run the same command again later, or "
              "raise --storage-attempts)")


def error_reason(err: BaseException) -> str:
    """``err`` as one line for a user: its type and the first line of its message, credentials redacted."""
    return redact_text(f"{type(err).__name__}: {err}".strip().splitlines()[0])


def storage_options(url: str, endpoint_url: str | None, attempts: int = STORAGE_ATTEMPTS) -> dict:
    """fsspec keyword arguments for ``url``. S3 (``s3://`` / ``s3a://``): botocore's retry config with ``attempts``
    tries per request, and the endpoint override. (s3fs adds its own fixed retries of a response body cut off
    mid-transfer and of SlowDown answers, on top.)"""
    if urllib.parse.urlsplit(url).scheme not in ("s3", "s3a"):
        return {}
    options = {"config_kwargs": {"retries": {"mode": _RETRY_MODE, "max_attempts": attempts}}}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


def open_fs(url: str, endpoint_url: str | None = None,
            attempts: int = STORAGE_ATTEMPTS) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``url`` and the path inside it (protocol stripped); S3 retries as `storage_options`."""
    return fsspec.core.url_to_fs(url, **storage_options(url, endpoint_url, attempts))


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a fault that may pass: throttling, 5xx, a reset or
    refused connection, a timeout. False for permanent answers: missing (404), denied (403), other 4xx, local
    file errors such as FileNotFoundError / PermissionError, and anything else unknown."""
    import aiohttp  # s3fs's transport (through aiobotocore)
    import botocore.exceptions

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, botocore.exceptions.ClientError):
            error = err.response.get("Error", {})
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = str(error.get("Code", ""))
            return (code in _TRANSIENT_CODES or status >= 500 or status == _TOO_MANY_REQUESTS
                    or code.isdigit() and (int(code) >= 500 or int(code) == _TOO_MANY_REQUESTS))
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(err, (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError,
                            botocore.exceptions.ResponseStreamingError, ConnectionError, TimeoutError,
                            asyncio.TimeoutError, http.client.IncompleteRead, fsspec.exceptions.FSTimeoutError,
                            aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False




def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(prefix: str, *names: str) -> str:
    return posixpath.join(prefix.rstrip("/"), *names)


def canonical_location(spec: str) -> str:
    """``spec`` as a comparable location: local paths absolute and normalised (``file://`` prefix), URLs with
    their path normalised and no trailing slash. Does no IO."""
    if "://" not in spec or spec.startswith("file://"):
        path = os.path.abspath(fsspec.core.url_to_fs(os.path.expanduser(spec))[1])
        return "file://" + posixpath.normpath(path)
    parts = urllib.parse.urlsplit(spec)
    return f"{parts.scheme}://{parts.netloc}{posixpath.normpath('/' + parts.path.lstrip('/')).rstrip('/')}"


def nested_location(input_spec: str, output: str) -> str | None:
    """A sentence when the output lies inside the input folder or the input inside the output (a re-run would
    label the tool's own files, or write into what it reads); None when they are apart. A glob's folder is
    the part before its first wildcard."""
    root = GLOB_CHARS.split(input_spec, 1)[0]
    source = canonical_location(root.rsplit("/", 1)[0] if root != input_spec else input_spec)
    target = canonical_location(output)
    if source == target:
        return f"--output {redact_uri(output)} is the input folder itself; choose an output outside it"
    if target.startswith(source + "/"):
        return (f"--output {redact_uri(output)} is inside the input {redact_uri(input_spec)}: the next run would "
                "label its own files; choose an output outside the input")
    if source.startswith(target + "/"):
        return (f"the input {redact_uri(input_spec)} is inside --output {redact_uri(output)}: choose an output "
                "that does not contain the input")
    return None


def publish_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` appear at ``path`` whole or not at all (temp file + rename locally; one PUT on stores)."""
    with open_for_publish(fs, path, "wb") as out:
        out.write(data)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """Make ``data`` appear at ``path`` whole, only if nothing is there yet; raises FileExistsError otherwise.
    Returns the version of what it wrote (see `read_versioned`).

    Of several writers racing, exactly one succeeds: locally a temp file hard-linked to ``path`` (link fails
    if the name exists); on S3 a conditional PUT (``If-None-Match: *``).
    """
    if not is_local(fs):
        return fs.pipe_file(path, data, mode="create")["ETag"]
    folder = posixpath.dirname(path)
    fs.makedirs(folder, exist_ok=True)
    temp = join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as out:
            out.write(data)
        os.link(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return _local_version(data)


def read_versioned(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    """The content of ``path`` and its version: a tag that changes whenever the content is replaced (S3: the
    object's ETag, read in the same GET as the content; locally: a hash of the content). FileNotFoundError if
    there is nothing at ``path``."""
    if is_local(fs):
        with open(path, "rb") as source:
            data = source.read()
        return data, _local_version(data)
    fs.invalidate_cache(path)
    with fs.open(path, "rb", cache_type="none") as source:  # s3fs reads with If-Match: the ETag of its HEAD
        return source.read(), source.details["ETag"]


def replace_if_unchanged(fs: fsspec.AbstractFileSystem, path: str, version: str, data: bytes) -> str | None:
    """Replace the content of ``path`` by ``data`` only if it is still at ``version`` (from `read_versioned` or a
    write here); return the new version, or None if ``path`` was replaced or removed in the meantime.

    Of several writers racing to replace one version, exactly one succeeds: on S3 a conditional PUT
    (``If-Match: <ETag>``); locally the file is locked (``flock``), checked to be still the file at ``path`` with
    that content, and replaced by rename while locked.
    """
    import botocore.exceptions

    if not is_local(fs):
        try:
            return fs.pipe_file(path, data, IfMatch=version)["ETag"]
        except (FileNotFoundError, OSError) as err:
            cause = err.__cause__
            if isinstance(err, FileNotFoundError) or (isinstance(cause, botocore.exceptions.ClientError)
                                                      and cause.response.get("Error", {}).get("Code") == "PreconditionFailed"):
                return None
            raise
    import fcntl

    try:
        locked = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(locked, fcntl.LOCK_EX)  # racing replacers of this file take turns from here
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return None
        if (current.st_ino, current.st_dev) != (os.fstat(locked).st_ino, os.fstat(locked).st_dev):
            return None  # replaced by an earlier holder of the lock
        with open(path, "rb") as source:
            if _local_version(source.read()) != version:
                return None
        publish_bytes(fs, path, data)  # temp + rename, while the replaced file is still locked
    finally:
        os.close(locked)  # also releases the lock
    return _local_version(data)


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def open_for_publish(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator:
    """A writable file whose content appears at ``path`` only when the block ends without an exception.

    Local: written to a hidden temp name in the same folder, then renamed (atomic on POSIX). Object
    stores: the object becomes visible only when the upload completes; on an exception the upload is
    discarded so nothing half-written is ever visible under ``path``.
    """
    folder = posixpath.dirname(path)
    if is_local(fs):
        fs.makedirs(folder, exist_ok=True)  # object stores have no folders (and s3fs would create a missing bucket)
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
