"""Read and decode stage (CPU): image URI → RGB pixels resized for the model, or an error row with a reason.
Never raises per image.

Images are decoded by the project's one decoder, `ovsam.images.decode_image` (RGB uint8, display
orientation), and resized for the model here (`ovsam.transforms.resize_for_model`, the release's filter).
What travels to the model stage is the resized uint8 image as raw bytes plus the original width/height (a
flat binary column streams through Ray's object store without ragged-tensor handling). Measured on a
1600x1200 photo (`benchmarks/bench_gpu.py`, README): the JPEG is the smallest (decoding it in the model actor
would cost that actor's CPU slot tens of ms per image), the decoded RGB the largest; the resized image is
in between, and leaves the model actor only the copy to its device.
"""

from __future__ import annotations

import numpy as np

from ovsam.images import UNREADABLE, DecodeError, decode_image
from ovsam.redaction import redact_text, redact_uri
from ovsam.transforms import resize_for_model
from pipelines.storage import STORAGE_ATTEMPTS, is_transient, open_fs

# Not an error row: a transient storage fault (throttling, 5xx, reset, timeout) outlasted the retries. The
# writer stage drops such rows and counts them, so the image has no row and the next run labels it.
DEFERRED = "deferred"


class ReadAndDecode:
    """Ray Data stage: batch with ``source_uri`` (what the user gave, credentials included: what is fetched),
    ``image_uri`` (its redacted form: what is stored and printed) and pass-through columns → adds width,
    height, pixels, status. ``input_size``: side S of the model input.

    Output columns: ``width``/``height`` (int32, of the decoded image, -1 for errors), ``pixels`` (bytes of the
    [rh, rw, 3] uint8 image resized for the model, `ovsam.transforms.ImageFrame.for_image(height, width, S)`
    gives rh, rw; empty for errors), ``error_kind``/``error`` (empty strings when decoded).
    A row whose ``entry_error_kind`` is set (its manifest row is malformed, `pipelines.inputs.Admit`) is not
    fetched; it becomes that error.
    """

    def __init__(self, endpoint_url: str | None, input_size: int, storage_attempts: int = STORAGE_ATTEMPTS):
        self.endpoint_url = endpoint_url
        self.input_size = input_size
        self.storage_attempts = storage_attempts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        widths, heights, pixels, kinds, errors = [], [], [], [], []
        for uri, entry_kind, entry_error in zip(batch["source_uri"], batch["entry_error_kind"], batch["entry_error"]):
            try:
                if entry_kind:  # a malformed manifest row: the image's error row, without fetching it
                    raise DecodeError(entry_kind, entry_error)
                rgb = decode_image(self._read(uri))
                height, width = rgb.shape[:2]
                widths.append(width)
                heights.append(height)
                pixels.append(resize_for_model(rgb, self.input_size).pixels.tobytes())
                kinds.append("")
                errors.append("")
            except DecodeError as err:
                widths.append(-1)
                heights.append(-1)
                pixels.append(b"")
                kinds.append(err.kind)
                errors.append(str(err))
        return {**batch, "width": np.array(widths, np.int32), "height": np.array(heights, np.int32),
                "pixels": np.array(pixels, dtype=object), "error_kind": np.array(kinds, dtype=object),
                "error": np.array(errors, dtype=object)}

    def _read(self, uri: str) -> bytes:
        try:
            fs, path = open_fs(uri, self.endpoint_url, self.storage_attempts)
            with fs.open(path, "rb") as source:
                return source.read()
        except Exception as err:  # noqa: BLE001 - a permanent failure (missing, denied) is the image's error row
            kind = DEFERRED if is_transient(err) else UNREADABLE
            raise DecodeError(kind, f"could not read {redact_uri(uri)}: "
                                    f"{type(err).__name__}: {redact_text(str(err))}") from None
