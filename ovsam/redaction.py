"""The one URL redaction of the project: what may be stored or printed of a URL that can carry secrets.

Used for input image URIs (stored in the label tables), weight sources (printed in errors, stored in
configs) and error messages. Standard library only, so the model package and the pipelines share it.
"""

from __future__ import annotations

import os
import re
import urllib.parse

REDACTED = "REDACTED"
# Query parameters that carry secrets in signed URLs (S3/GCS/Azure presigned, generic tokens).
_SECRET_QUERY_KEY = re.compile(r"signature|credential|token|secret|password|key|sig$|^x-amz-", re.I)
_SECRET_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MIN_SECRET_LENGTH = 4  # shorter values would blank ordinary words; real keys are 16+ characters
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """``uri`` without user:password and with secret-looking query values replaced by ``REDACTED``.

    Local paths are returned unchanged. ``https://u:p@h/a.jpg?X-Amz-Signature=s&v=1`` becomes
    ``https://h/a.jpg?X-Amz-Signature=REDACTED&v=1``: still says which object, no longer opens it.
    """
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urllib.parse.urlencode(
        [(key, REDACTED if _SECRET_QUERY_KEY.search(key) else value)
         for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)], safe="/:")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (e.g. an error message) with every URL in it passed through `redact_uri`, and any credential
    of the environment's AWS chain (some S3 errors echo the key id) replaced by ``REDACTED``."""
    text = _URL_IN_TEXT.sub(lambda match: redact_uri(match.group()), text)
    for name in _SECRET_ENVIRONMENT:
        if len(value := os.environ.get(name, "")) >= _MIN_SECRET_LENGTH:
            text = text.replace(value, REDACTED)
    return text
