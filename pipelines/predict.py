"""Model stage (actor pool, one GPU each when there are GPUs): decoded images → images rows + annotation rows.

One image embedding per image with all of its prompts batched (the predictor's contract). Masks are
encoded to COCO RLE here, inside the actor, so only compact RLE strings leave it: an image's raw masks
(N × H × W bool) can be far larger than the image itself.

Box mode: a box prompt is given in original-image pixels (x1, y1, x2, y2) after EXIF orientation. A box
partly outside the image is clipped to it; an image with a box wholly outside it (``prompt_outside_image``),
a degenerate box (``invalid_prompt``) or no box at all (``no_prompts``) becomes one error row for the whole
image, so that fixing the prompts file and labelling the image again gives a complete set.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.config import LabelConfig
from ovsam.redaction import redact_text
from ovsam.transforms import ImageFrame, ResizedImage
from schemas.annotations import AnnotationColumns, TooManyAnnotationsError
from schemas.tables import STATUS_ERROR, STATUS_OK

NO_PROMPTS = "no_prompts"
TOO_MANY_OBJECTS = "too_many_objects"
MODEL_ERROR = "model_error"  # the model failed on this image for another reason (message says which)
# Pixels of the images in one model call: the decoded images of a group are held together while their
# embeddings are computed in one batch and their masks encoded (masks stay low-res logits on the device and
# are upscaled in bounded chunks, see `ovsam.predictor.MASK_UPSCALE_PIXELS`); 16 MP is sixteen 1 MP photos
# (embeddings batched as the GPU likes) or one large scan alone.
MAX_PIXELS_PER_MODEL_CALL = 16_000_000


# A model worker that dies (SIGKILL, out of memory) is restarted by Ray and its batch given to it again. Given
# again, the batch's images go to the model one at a time, and an image during which the worker died this many
# times alone becomes a `MODEL_ERROR` row: one death can be a neighbour's memory spike, two alone are the image.
MAX_WORKER_DEATHS = 2


def model_task_retries(batch_size: int) -> int:
    """How often a batch may be given again to a restarted model worker: once to find out that the batch is
    suspect, then `MAX_WORKER_DEATHS` per image. Ray Data gives a batch again as often as its worker dies; the
    model stage counts the deaths (`CrashLedger`) and, beyond this, gives the batch's images up as `MODEL_ERROR`
    rows, so a batch never loops forever (also when its worker dies outside any one image's model call)."""
    return 1 + batch_size * MAX_WORKER_DEATHS


class WorkerDied(Exception):
    """The model worker's process died each time it was given this image."""


class CrashLedger:
    """Ray actor shared by the model workers: counts the model calls begun and not finished, per batch and per
    image. A call still counted when it begins again was cut off by the death of its worker."""

    def __init__(self):
        self._begun: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Note that the call ``key`` begins; return how often it began before without finishing."""
        previous = self._begun.get(key, 0)
        self._begun[key] = previous + 1
        return previous

    def end(self, key: str) -> None:
        self._begun.pop(key, None)


class PromptCheckError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def checked_boxes(packed_boxes: bytes, width: int, height: int) -> np.ndarray:
    """float32 bytes x1, y1, x2, y2, ... (pixels) → [N, 4] float32 boxes clipped to the image.

    Raises `PromptCheckError` for no box, or for a box the model would refuse (`ovsam.PromptError`: not
    finite, empty, or wholly outside the image), before the image joins a batched model call.
    """
    import ovsam
    from ovsam.transforms import validate_boxes

    boxes = np.frombuffer(packed_boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        raise PromptCheckError(NO_PROMPTS, "box mode, but the prompts file has no box for this image")
    try:
        return validate_boxes(boxes, (height, width))
    except ovsam.PromptError as err:
        raise PromptCheckError(err.kind, str(err)) from err


def serialize(columns: AnnotationColumns) -> bytes:
    """Arrow IPC stream of one image's validated annotation rows (how they travel to the writer stage)."""
    table = columns.to_table()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def deserialize(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    """What the driver puts in Ray's object store once for all model actors, on any node: the model as the files
    of a model directory (`model_files`) and the run vocabulary's class embeddings ([K, P, E] float32, as
    `ovsam.Predictor` makes them), so that N actors neither fetch the weights nor embed the vocabulary N times."""

    files: dict[str, bytes]
    class_embeddings: np.ndarray


def ship_model(model, vocabulary) -> ShippedModel:
    """The driver's model and its embedding of ``vocabulary`` (the vocabulary cache serves a repeated run)."""
    import ovsam

    embeddings = ovsam.Predictor(model, vocabulary).class_embeddings
    return ShippedModel(model_files(model), embeddings.cpu().numpy())


def model_files(model) -> dict[str, bytes]:
    """The model as the files of a model directory (`ovsam.save_model`: config JSON + one safetensors file per
    weight role), file name → content: what the driver puts in Ray's object store once, so that every model
    actor, on any node, builds the very model the driver loaded, wherever its preset and weights came from."""
    import ovsam

    with tempfile.TemporaryDirectory() as directory:
        ovsam.save_model(model, directory)
        return {path.name: path.read_bytes() for path in Path(directory).iterdir()}


def load_model_files(files: dict[str, bytes]):
    """The model of `model_files`, on the actor's device (CUDA when present)."""
    import ovsam

    with tempfile.TemporaryDirectory() as directory:
        for name, data in files.items():
            (Path(directory) / name).write_bytes(data)
        return ovsam.load_model(directory)


class LabelImages:
    """Ray Data stage holding one model: decoded-image batch → one result row per image.

    Output columns: image_uri, width, height, status, error_kind, error, num_annotations and
    ``annotations`` (Arrow IPC bytes of the image's `ANNOTATIONS_SCHEMA` rows; empty for error rows).
    ``model``: object ref of the driver's `ShippedModel`. ``crashes``: the run's `CrashLedger` actor (see
    `MAX_WORKER_DEATHS`).

    Calls may run concurrently in threads (`pipelines.label.MODEL_CALLS_PER_GPU_WORKER`): a call keeps its state in
    locals and uses only the predictor's stateless batch methods.
    """

    def __init__(self, config: LabelConfig, vocabulary, model, cpu_threads: int, crashes):
        import ray
        import torch

        import ovsam

        torch.set_num_threads(cpu_threads)  # the CPU slots Ray reserved for this actor (see `plan_workers`)
        self.config = config
        self.crashes = crashes
        shipped: ShippedModel = ray.get(model)
        self.model = load_model_files(shipped.files)
        self.label_names = vocabulary.names
        self.predictor = ovsam.Predictor(self.model, vocabulary, top_k=config.top_k,
                                         class_embeddings=torch.tensor(shipped.class_embeddings),
                                         compile_encoder=config.compile)
        self.labeller = (ovsam.AutomaticLabeller(self.predictor, config.automatic)
                         if config.mode == "auto" else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_uri"])
        status = [STATUS_OK] * count
        kinds = list(batch["error_kind"])
        errors = list(batch["error"])
        annotations: list[bytes] = [b""] * count
        num_annotations = [0] * count
        todo: dict[int, tuple[ResizedImage, np.ndarray | None]] = {}  # row → (image, boxes)
        for row in range(count):
            if kinds[row]:
                status[row] = STATUS_ERROR
                continue
            width, height = int(batch["width"][row]), int(batch["height"][row])
            frame = ImageFrame.for_image(height, width, self.model.config.image_size)
            image = ResizedImage(np.frombuffer(batch["pixels"][row], np.uint8).reshape(*frame.resized_size, 3), frame)
            try:
                boxes = (checked_boxes(batch["prompt_boxes"][row], width, height)
                         if self.config.mode == "box" else None)
            except PromptCheckError as err:
                status[row], kinds[row], errors[row] = STATUS_ERROR, err.kind, str(err)
                continue
            todo[row] = (image, boxes)

        import ray

        batch_key = "batch:" + "\n".join(batch["image_uri"][row] for row in todo)
        deaths = ray.get(self.crashes.begin.remote(batch_key)) if todo else 0
        if deaths > model_task_retries(len(todo)):
            outcomes = [WorkerDied(f"the model worker process died {deaths} times while labelling the batch of "
                                   "this image (killed, e.g. out of memory, or crashed)")] * len(todo)
        elif deaths:
            outcomes = self._predict_one_by_one([batch["image_uri"][row] for row in todo], list(todo.values()))
        else:
            outcomes = self._predict(list(todo.values()))
        for row, outcome in zip(todo, outcomes):
            uri = batch["image_uri"][row]
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                columns = AnnotationColumns.from_prediction(uri, outcome, self.label_names)
                annotations[row] = serialize(columns)
                num_annotations[row] = len(columns)
            except TooManyAnnotationsError as err:
                status[row], kinds[row], errors[row] = STATUS_ERROR, TOO_MANY_OBJECTS, str(err)
            except Exception as err:  # noqa: BLE001 - one image's failure is its error row, never the run's
                status[row], kinds[row] = STATUS_ERROR, _error_kind(err)
                errors[row] = redact_text(f"{type(err).__name__}: {err}")
        if todo:
            ray.get(self.crashes.end.remote(batch_key))
        return {
            "image_uri": batch["image_uri"], "width": batch["width"], "height": batch["height"],
            "status": np.array(status, dtype=object), "error_kind": np.array(kinds, dtype=object),
            "error": np.array(errors, dtype=object), "num_annotations": np.array(num_annotations, np.int32),
            "annotations": np.array(annotations, dtype=object),
        }

    def _predict(self, work: list[tuple[ResizedImage, np.ndarray | None]]) -> Iterator:
        """Predictions for ``work`` in order, one at a time; an image whose prediction fails yields its exception.

        Images go to the model in groups of at most `MAX_PIXELS_PER_MODEL_CALL` pixels (one batched embedding
        pass each), and each group's masks are encoded before the next group runs. If a group fails, each of its images is redone alone to find which
        one failed without losing the others.
        """
        for group in pixel_groups(work):
            images = [image for image, _ in group]
            try:
                if self.labeller is not None:
                    predictions = self.labeller.generate_images(images)
                else:
                    predictions = self.predictor.predict_images(images, [boxes for _, boxes in group])
            except Exception:  # noqa: BLE001 - isolate the failing image below
                predictions = [self._predict_alone(image, boxes) for image, boxes in group]
            yield from predictions
            del predictions  # this group's masks are encoded: free them before the next group runs

    def _predict_one_by_one(self, uris: list[str], work: list[tuple[ResizedImage, np.ndarray | None]]) -> Iterator:
        """Predictions for a batch during which a worker died: each image alone, noted in the crash ledger, so that
        an image that kills the worker is found and, after `MAX_WORKER_DEATHS`, yields `WorkerDied` instead."""
        import ray

        for uri, (image, boxes) in zip(uris, work):
            key = "image:" + uri
            deaths = ray.get(self.crashes.begin.remote(key))
            if deaths >= MAX_WORKER_DEATHS:
                outcome = WorkerDied(f"the model worker process died each time it labelled this image alone "
                                     f"({deaths} times: killed, e.g. out of memory, or crashed)")
            else:
                outcome = self._predict_alone(image, boxes)
            ray.get(self.crashes.end.remote(key))
            yield outcome

    def _predict_alone(self, image: ResizedImage, boxes: np.ndarray | None):
        try:
            if self.labeller is not None:
                return self.labeller.generate(image)
            return self.predictor.predict_images([image], [boxes])[0]
        except Exception as err:  # noqa: BLE001 - becomes this image's error row
            return err


def pixel_groups(work: list[tuple[ResizedImage, np.ndarray | None]]) -> Iterator[list]:
    """Consecutive groups of ``work`` whose images hold at most `MAX_PIXELS_PER_MODEL_CALL` original pixels
    together (an image larger than that forms a group of its own)."""
    group, pixels = [], 0
    for item in work:
        size = item[0].frame.original_size[0] * item[0].frame.original_size[1]
        if group and pixels + size > MAX_PIXELS_PER_MODEL_CALL:
            yield group
            group, pixels = [], 0
        group.append(item)
        pixels += size
    if group:
        yield group


def _error_kind(err: Exception) -> str:
    import ovsam

    if isinstance(err, ovsam.PromptError):
        return err.kind
    return MODEL_ERROR
